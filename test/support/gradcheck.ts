// Test support: finite-difference gradient probes shared by the model tests
// (test/models.grad.test.ts, test/lora.test.ts).
// float32 losses carry ~1e-7 relative noise, so eps = 1e-2 keeps the difference quotient's
// rounding error near 1e-5 while its O(eps²) truncation error stays small for the
// perturbed (not init-scale) params used here (agreement seen: < 1% relative). A ReLU
// kink (the classifier's dense layer) inside ±eps makes that quotient an average of two
// slopes, so each probe is also taken at eps/10, and a probe passes if either agrees.
import type { Batch, ModelDef } from "../../shared/models/model.ts"
import { evalLoss } from "../../shared/models/model.ts"
import { Rng } from "../../shared/models/rng.ts"

export const EPS = [1e-2, 1e-3] as const
export const ATOL = 5e-4
export const RTOL = 3e-2

export interface Probe {
  readonly tensor: string
  readonly what: string
  /** finite-difference directional derivative, one per EPS */
  readonly fd: readonly number[]
  /** the unit direction: coordinate -> weight */
  readonly u: Map<number, number>
}

/** For each tensor in `names` (default: every spec): along its largest-gradient coordinate, two random coordinates and one random unit direction (±1/√n). */
export const finiteDifferences = (
  def: ModelDef,
  params: Map<string, Float32Array>,
  batch: Batch,
  grads: ReadonlyMap<string, Float32Array>,
  names: readonly string[] = def.specs.map((s) => s.name)
): Probe[] => {
  const rng = new Rng(11)
  const probes: Probe[] = []
  for (const name of names) {
    const p = params.get(name)!
    const g = grads.get(name)!
    let top = 0
    for (let i = 1; i < g.length; i++) if (Math.abs(g[i]) > Math.abs(g[top])) top = i
    const dirs: Array<[string, Map<number, number>]> = [
      [`coord ${top} (largest |g|)`, new Map([[top, 1]])],
      ...[0, 1].map((): [string, Map<number, number>] => {
        const i = rng.int(g.length)
        return [`coord ${i}`, new Map([[i, 1]])]
      }),
      ["random direction", new Map(Array.from(p, (_, i): [number, number] => [i, (rng.uniform() < 0.5 ? -1 : 1) / Math.sqrt(p.length)]))]
    ]
    for (const [what, u] of dirs) {
      const saved = Float32Array.from(p)
      const fd = EPS.map((eps) => {
        for (const [i, w] of u) p[i] = saved[i] + eps * w
        const lp = evalLoss(def, params, batch)
        for (const [i, w] of u) p[i] = saved[i] - eps * w
        const lm = evalLoss(def, params, batch)
        p.set(saved)
        return (lp - lm) / (2 * eps)
      })
      probes.push({ tensor: name, what, fd, u })
    }
  }
  return probes
}

/** The probes where `grads` disagrees with the finite differences. */
export const mismatches = (probes: readonly Probe[], grads: ReadonlyMap<string, Float32Array>): string[] =>
  probes.flatMap((pr) => {
    const g = grads.get(pr.tensor)!
    let an = 0
    for (const [i, w] of pr.u) an += g[i] * w
    const ok = pr.fd.some((fd) => Math.abs(an - fd) <= ATOL + RTOL * Math.max(Math.abs(an), Math.abs(fd)))
    const fds = pr.fd.map((fd) => fd.toExponential(3)).join(" / ")
    return ok ? [] : [`${pr.tensor} ${pr.what}: analytic ${an.toExponential(3)} vs finite-diff ${fds} (eps ${EPS.join(" / ")})`]
  })
