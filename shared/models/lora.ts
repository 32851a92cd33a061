// Implements: what to do with the GPT's LoRA adapters (Hu et al. 2021) around training:
// their names, which tensors a LoRA job trains, and merging them into the base weights
// (W ← W + (alpha/r)·A·B) so a finished run exports a plain GPT that needs no adapters.
// Owns: adapter naming (`<layer>.lora_A` / `.lora_B`), the trainable set, merging. Does
// not own: the adapters' specs, init and forward (gpt.ts), the job's `train.lora` block
// (shared/config/job.ts), or freezing in the optimizer (the parameter server).
//
// Shapes: a linear layer L has weight [in, out]; A = L.lora_A [in, r], B = L.lora_B [r, out].

import type { GptConfig } from "./gpt.ts"
import { gptLoraLayers, gptSpecs, resolveGptConfig } from "./gpt.ts"
import { sizeOf } from "./model.ts"

/** Is `name` an adapter tensor (`….lora_A` / `….lora_B`)? */
export const isLoraParam = (name: string): boolean => name.endsWith(".lora_A") || name.endsWith(".lora_B")

/** The adapter tensors of `c`, in spec order (A then B per adapted layer); [] without `lora`. */
export const loraParamNames = (c: GptConfig): string[] =>
  gptLoraLayers(resolveGptConfig(c)).flatMap((l) => [`${l.name}.lora_A`, `${l.name}.lora_B`])

/** What a LoRA job trains: the adapters only (every base tensor is frozen), in spec order. */
export const loraTrainable = (c: GptConfig): string[] => loraParamNames(c)

/** `c` without adapters: the model a merged checkpoint is for. */
export const withoutLora = (c: GptConfig): GptConfig => {
  const { lora: _, ...base } = c
  return base
}

/**
 * The base model's params, adapters folded in: for each adapted layer, a new weight
 * W + (alpha/r)·A·B (accumulated in float64, one rounding per entry); every other base
 * tensor is the input's own array (not copied); no adapter tensors. Keys in base spec
 * order, so the result loads into makeGpt(withoutLora(c)). Without `lora`, the base params.
 */
export const mergeLora = (c: GptConfig, params: ReadonlyMap<string, Float32Array>): Map<string, Float32Array> => {
  const rc = resolveGptConfig(c)
  const want = (name: string, n: number): Float32Array => {
    const v = params.get(name)
    if (v === undefined) throw new Error(`mergeLora: missing parameter "${name}"`)
    if (v.length !== n) throw new Error(`mergeLora: parameter "${name}" has ${v.length} values, expected ${n}`)
    return v
  }
  const out = new Map<string, Float32Array>()
  for (const s of gptSpecs(withoutLora(rc))) out.set(s.name, want(s.name, sizeOf(s.shape)))
  if (rc.lora === undefined) return out
  const r = rc.lora.rank
  const scale = rc.lora.alpha / r
  for (const { name, inDim, outDim } of gptLoraLayers(rc)) {
    const W = out.get(name + ".weight")! // [in, out]
    const A = want(name + ".lora_A", inDim * r) // [in, r]
    const B = want(name + ".lora_B", r * outDim) // [r, out]
    const merged = new Float32Array(W.length)
    const row = new Float64Array(outDim)
    for (let i = 0; i < inDim; i++) {
      row.fill(0)
      for (let k = 0; k < r; k++) {
        const a = A[i * r + k]
        if (a === 0) continue
        for (let j = 0; j < outDim; j++) row[j] += a * B[k * outDim + j]
      }
      for (let j = 0; j < outDim; j++) merged[i * outDim + j] = W[i * outDim + j] + scale * row[j]
    }
    out.set(name + ".weight", merged)
  }
  return out
}
