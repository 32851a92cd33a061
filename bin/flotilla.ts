#!/usr/bin/env node
// The `flotilla` command (see cli/main.ts). Runs on Node >= 22.18 with native type stripping.
import { main } from "../cli/main.ts"

await main(process.argv.slice(2))
