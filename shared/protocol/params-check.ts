/**
 * Implements: what a params bundle (`ps.<k>.version` broadcasts, pull replies) must be
 * before any computing actor (worker, pipeline stage, evaluator) looks at its numbers —
 * one pure check, `checkParams`: kind `params` of this job, a ParamsMeta for a shard it
 * reads (the one the subject or the pull named), a version in [0, train.steps], an
 * incarnation (a start time) not in the future, exactly the shard's tensor names with
 * their shapes, dtypes float32 (or bf16 when train.compression.params is bf16), and every
 * value finite once widened (shared/wire/codecs.ts decodeTensor). It returns the decoded
 * tensors, so the caller decodes once.
 * Does not own: which versions are believed (actors/worker/params-cache.ts: monotonic per
 * incarnation, confirmed by the server), reporting (the actor's shell, on `errors`).
 */
import { Result } from "effect"
import type { JobConfig } from "../config/job.ts"
import { allFinite } from "../optim/clip.ts"
import { decodeTensor } from "../wire/codecs.ts"
import type { TensorBundle } from "../wire/tensor.ts"
import { decodeValue } from "./decode.ts"
import { ParamsMeta, type ErrorCode } from "./messages.ts"
import type { Spec } from "./sharding.ts"

export interface ParamsExpectation {
  readonly job: string
  readonly steps: number
  /** each shard this actor reads: its tensors (name → shape), as the server holds them. */
  readonly shards: ReadonlyMap<number, ReadonlyMap<string, readonly number[]>>
  /** bf16 tensors are allowed (train.compression.params: bf16). */
  readonly bf16: boolean
}

export type ParamsChecked =
  | { readonly ok: true; readonly meta: ParamsMeta; readonly params: Map<string, Float32Array> }
  | { readonly ok: false; readonly code: ErrorCode; readonly reason: string }

/** An incarnation is a start time (ms): one more than an hour ahead of this clock is refused. */
const INCARNATION_SKEW_MS = 3_600_000

/** What `job`'s params bundles of `reads` (default: every shard) hold. */
export const paramsExpectation = (job: JobConfig, specs: readonly Spec[], shardOf: ReadonlyMap<string, number>, reads?: readonly number[]): ParamsExpectation => {
  const shards = new Map<number, Map<string, readonly number[]>>()
  for (const k of reads ?? Array.from({ length: job.topology.psShards }, (_, i) => i)) shards.set(k, new Map())
  for (const sp of specs) shards.get(shardOf.get(sp.name)!)?.set(sp.name, sp.shape)
  return { job: job.job, steps: job.train.steps, shards, bf16: job.train.compression.params === "bf16" }
}

/** The shard of a `…ps.<k>.version` subject, or undefined. */
export const shardOfSubject = (subject: string): number | undefined => {
  const m = /\.ps\.(\d+)\.version$/.exec(subject)
  return m ? Number(m[1]) : undefined
}

const fail = (code: ErrorCode, reason: string): ParamsChecked => ({ ok: false, code, reason })

/** Check a params bundle (expected to be shard `shard`'s, when the subject or pull says) and decode its tensors. */
export const checkParams = (b: TensorBundle, x: ParamsExpectation, now: number, shard?: number): ParamsChecked => {
  const m = b.meta
  if (m.kind !== "params") return fail("bad-message", `expected a params bundle, got ${JSON.stringify(m.kind)}`)
  if (m.job !== x.job) return fail("wrong-job", `params of job ${JSON.stringify(m.job)}, this is ${JSON.stringify(x.job)}`)
  const pm = decodeValue(ParamsMeta, "params meta", m.extra ?? {})
  if (Result.isFailure(pm)) return fail("bad-message", pm.failure.reason)
  const meta = pm.success
  if (shard !== undefined && meta.shard !== shard) return fail("bad-message", `params of shard ${meta.shard} on shard ${shard}'s subject`)
  const specs = x.shards.get(meta.shard)
  if (specs === undefined) return fail("bad-message", `params of shard ${meta.shard}: not a shard this actor reads ([${[...x.shards.keys()]}])`)
  if (!(Number.isInteger(m.version) && m.version >= 0 && m.version <= x.steps)) return fail("invalid-value", `params version ${m.version} is outside [0, ${x.steps}] (train.steps)`)
  if (meta.incarnation > now + INCARNATION_SKEW_MS) return fail("invalid-value", `incarnation ${meta.incarnation} is a start time in the future`)
  const names = new Set(b.tensors.map((t) => t.name))
  const missing = [...specs.keys()].filter((n) => !names.has(n))
  const extra = [...names].filter((n) => !specs.has(n))
  if (missing.length > 0 || extra.length > 0 || names.size !== b.tensors.length) {
    return fail("bad-tensor", `params of shard ${meta.shard}: ${missing.length > 0 ? `missing ${missing.join(", ")}` : ""}${missing.length > 0 && extra.length > 0 ? "; " : ""}${extra.length > 0 ? `not the shard's: ${extra.join(", ")}` : ""}${names.size !== b.tensors.length ? "a tensor named twice" : ""}`)
  }
  const params = new Map<string, Float32Array>()
  for (const t of b.tensors) {
    const shape = specs.get(t.name)!
    if (t.shape.length !== shape.length || t.shape.some((d, i) => d !== shape[i])) return fail("bad-tensor", `params ${t.name} has shape [${t.shape}], the model's is [${shape}]`)
    if (!(t.dtype === "float32" || (t.dtype === "bf16" && x.bf16))) return fail("bad-tensor", `params ${t.name} is ${t.dtype}; this job's params travel float32${x.bf16 ? " or bf16" : ""}`)
    const v = decodeTensor(t)
    if (!allFinite(v)) {
      const i = v.findIndex((y) => !Number.isFinite(y))
      return fail("non-finite", `params ${t.name}[${i}] is ${v[i]}`)
    }
    params.set(t.name, v)
  }
  return { ok: true, meta, params }
}
