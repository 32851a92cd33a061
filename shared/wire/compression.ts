/**
 * Implements: a job's compression policy — which codec a gradient travels under, and the
 * sender's side of error feedback:
 *  - `gradCodecAt`: the codec of a gradient computed on params version v. The parameter
 *    server stamps it on every params bundle it sends (ParamsMeta.codec), so the workers
 *    (and a relay) encode each shard's gradient under the codec of the version they computed
 *    on: `set-compression` takes effect at the version the controller chose, for every
 *    sender and every shard alike. Before `warmupSteps` every gradient is f32.
 *  - `GradEncoder`: per tensor error-feedback residuals of one sender. A tensor smaller than
 *    `minElements` (biases, LayerNorm) travels f32; a lossy codec adds the residual first and
 *    keeps what it could not send; a switch to f32 sends what is owed and clears it. Its
 *    residuals are what a sender saves with its state (shared/checkpoint/sender-state.ts).
 *  - `paramsTensors`: the params broadcast under `params` (f32, or bf16 for tensors of at
 *    least `minElements`: the workers compute on bf16-rounded params, the server keeps f32).
 * Pure. Does not own: the codecs (codecs.ts), the bundle layout (tensor.ts), when a switch
 * happens (the controller chooses the version, the parameter server stamps it).
 */
import { encodeTensor, parseCodec, type CodecSpec } from "./codecs.ts"
import { toSparseRows } from "./rows.ts"
import type { WireTensor } from "./tensor.ts"
import { Result } from "effect"

export interface CompressionConfig {
  /** the gradient codec (shared/wire/codecs.ts): f32, bf16, int8, int4, sign1, topk:F. */
  readonly codec: string
  /** versions before this one push f32 gradients (compression starts once training settles). */
  readonly warmupSteps: number
  /** tensors with fewer elements travel f32 (biases, LayerNorm: tiny, and sensitive). */
  readonly minElements: number
  /** the params broadcast: f32, or bf16 (half the bytes down the link). */
  readonly params: "f32" | "bf16"
}

export const DEFAULT_COMPRESSION: CompressionConfig = { codec: "f32", warmupSteps: 0, minElements: 1024, params: "f32" }

/** A live `set-compression`: grads computed on versions ≥ fromVersion use `codec`. */
export interface CodecSwitch {
  readonly fromVersion: number
  readonly codec: string
}

/** The switches after `sw` is added: it replaces every one at or after its version (a later command wins). */
export const withSwitch = (switches: readonly CodecSwitch[], sw: CodecSwitch): CodecSwitch[] => [...switches.filter((x) => x.fromVersion < sw.fromVersion), sw]

/** The codec of a gradient computed on params `version`. */
export const gradCodecAt = (c: CompressionConfig, switches: readonly CodecSwitch[], version: number): string => {
  if (version < c.warmupSteps) return "f32"
  let codec = c.codec
  let from = -1
  for (const s of switches) if (s.fromVersion <= version && s.fromVersion >= from) [codec, from] = [s.codec, s.fromVersion]
  return codec
}

/** A codec name as a spec; throws with the registry's message (names were validated where they came in). */
export const specOf = (name: string): CodecSpec => {
  const r = parseCodec(name)
  if (Result.isFailure(r)) throw new RangeError(r.failure)
  return r.success
}

/** One sender's error-feedback state and encoding rules. */
export class GradEncoder {
  readonly residuals = new Map<string, Float32Array>()
  readonly minElements: number
  constructor(minElements: number) {
    this.minElements = minElements
  }

  /**
   * The wire tensors of one gradient tensor under `codec`. `grad` is the sender's own array:
   * with f32 (or a small tensor) an owed residual is added into it and cleared.
   */
  encode(codec: CodecSpec, name: string, shape: ReadonlyArray<number>, grad: Float32Array): WireTensor[] {
    if (codec.kind === "f32" || grad.length < this.minElements) {
      const owed = this.residuals.get(name)
      if (owed && owed.length === grad.length) for (let i = 0; i < grad.length; i++) grad[i] += owed[i]
      this.residuals.delete(name)
      return toSparseRows(name, shape, grad) ?? [{ name, dtype: "float32", shape, data: grad }]
    }
    let r = this.residuals.get(name)
    if (!r || r.length !== grad.length) this.residuals.set(name, (r = new Float32Array(grad.length)))
    return [encodeTensor(codec, name, shape, grad, r)]
  }

}

/** The params of a shard as wire tensors under the policy's `params` setting. */
export const paramsTensors = (c: CompressionConfig, specs: ReadonlyArray<{ readonly name: string; readonly shape: ReadonlyArray<number> }>, params: ReadonlyMap<string, Float32Array>): WireTensor[] => {
  const bf16 = c.params === "bf16" ? specOf("bf16") : undefined
  return specs.map((sp) => {
    const data = params.get(sp.name)!
    return bf16 && data.length >= c.minElements ? encodeTensor(bf16, sp.name, sp.shape, data) : { name: sp.name, dtype: "float32" as const, shape: sp.shape, data }
  })
}
