// Measures what making a parameter-server step all or nothing costs (actors/param-server/
// aggregate.ts applyChecked: the snapshot of params + optimizer slots before the step,
// snapshot.ts, and the finite scan of both after it): the time of one whole step (one
// push, aggregate, AdamW update, check) against the time of the snapshot and the scan
// alone, on one shard holding every tensor of a GPT. Owns: nothing but measurement.
// Run: node bench/apply-check.ts [--params N] [--steps K]   (~10-30 s)
import { ShardState } from "../actors/param-server/aggregate.ts"
import { StepSnapshot } from "../actors/param-server/snapshot.ts"
import { findNonFinite } from "../shared/optim/clip.ts"
import { resolveOptimizer } from "../shared/optim/optimizers.ts"

const arg = (name: string, d: number) => (process.argv.includes(name) ? Number(process.argv[process.argv.indexOf(name) + 1]) : d)
const N = arg("--params", 4_000_000)
const STEPS = arg("--steps", 20)
const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[xs.length >> 1]

// a handful of tensors, like a GPT's (one big embedding, square matrices, small vectors)
const sizes = [Math.floor(N * 0.4), Math.floor(N * 0.2), Math.floor(N * 0.2), Math.floor(N * 0.2) - 1024, 1024]
const specs = sizes.map((n, i) => ({ name: `t${i}`, shape: [n] }))
const opt = resolveOptimizer({ kind: "adamw", weightDecay: 0.01 } as never)
if (opt._tag !== "Success") throw new Error("optimizer")
const params = new Map(specs.map((s) => [s.name, Float32Array.from({ length: s.shape[0] }, (_, i) => Math.sin(i) * 0.02)]))
const shard = new ShardState({ specs, params, optimizer: opt.success, consistency: { mode: "sync" }, clipNorm: 1 })
const grads = new Map(specs.map((s) => [s.name, Float32Array.from({ length: s.shape[0] }, (_, i) => Math.cos(i) * 1e-3)]))

const whole: number[] = []
for (let v = 0; v < STEPS; v++) {
  shard.admit({ sender: "w0", version: v, batchId: `e0-b${v}`, samples: 1, tokens: 1, loss: 1, grads })
  const t0 = performance.now()
  shard.apply(1e-3, shard.choose(["w0"]))
  whole.push(performance.now() - t0)
}
const snap = new StepSnapshot("async_prev_grad")
const names = specs.map((s) => s.name)
const check: number[] = []
for (let i = 0; i < STEPS; i++) {
  const t0 = performance.now()
  snap.save(names, shard.params, shard.slots)
  findNonFinite(shard.params)
  const slots = new Map<string, Float32Array>()
  for (const [k, sl] of shard.slots) for (const [n, a] of Object.entries(sl)) slots.set(`${k}.${n}`, a)
  findNonFinite(slots)
  check.push(performance.now() - t0)
}
const w = median(whole)
const c = median(check)
console.log(JSON.stringify({ params: N, optimizer: "adamw", steps: STEPS, stepMs: +w.toFixed(2), checkMs: +c.toFixed(2), overhead: `${((100 * c) / (w - c)).toFixed(0)}%` }))
