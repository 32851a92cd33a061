// `npm run bench`: every benchmark, one after the other (each prints its own table of
// side-by-side ratios measured in the same run). `npm run bench -- wire dp` runs a subset.
// Benchmarks share the 2 cores with nothing else: close other work first; expect up to
// ~1.8x run-to-run variation on shared machines (PERF-NOTES), so compare ratios.
import { spawnSync } from "node:child_process"
import { existsSync } from "node:fs"
import { dirname, join } from "node:path"
import { fileURLToPath } from "node:url"

const here = dirname(fileURLToPath(import.meta.url))
const all = ["wire", "model", "dp", "pipeline", "tracing"]
const pick = process.argv.slice(2).filter((a) => !a.startsWith("-"))
const chosen = pick.length > 0 ? pick : all
let failed = 0
for (const name of chosen) {
  const file = join(here, `${name}.ts`)
  if (!existsSync(file)) {
    process.stderr.write(`bench ${name}: no such benchmark (have: ${all.join(", ")})\n`)
    failed++
    continue
  }
  process.stdout.write(`\n=== bench/${name}.ts\n`)
  const r = spawnSync(process.execPath, [file], { stdio: "inherit" })
  if (r.status !== 0) {
    process.stderr.write(`bench ${name} exited with ${r.status ?? r.signal}\n`)
    failed++
  }
}
process.exit(failed > 0 ? 1 : 0)
