// Implements: the correspondence between Flotilla's GPT (gpt.ts) and Hugging Face
// transformers' GPT-2 (GPT2LMHeadModel): state-dict names both ways, and config.json both
// ways. A Flotilla GPT exported with `toHfGpt2` + encodeSafetensors(…, HF_GPT2_METADATA)
// + `hfGpt2Config` is a model directory `GPT2LMHeadModel.from_pretrained` loads.
// Owns: the name mapping, which checkpoint entries are ignored, and which GPT-2 configs
// Flotilla can compute. Does not own: the safetensors bytes (shared/checkpoint/
// safetensors.ts), the GPT maths (gpt.ts), files, or the CLI command that exports.
//
// Why no conversion of values: both sides store linear weights [in, out] with y = x @ W
// (HF GPT-2 uses Conv1D, not nn.Linear), c_attn holds q, k, v side by side in its output
// columns, GELU is the tanh form ("gelu_new"), LayerNorm eps is 1e-5, and attention is
// scaled by 1/sqrt(head size). test/safetensors.test.ts holds Flotilla's logits against a
// PyTorch forward written the way HF computes it (tools/refs/gpt2_ref.py).
//
// Names: Flotilla `wte` ↔ `transformer.wte.weight`, `wpe` ↔ `transformer.wpe.weight`, and
// every other parameter `p` ↔ `transformer.p` (`h.0.attn.c_attn.weight`, `ln_f.bias`, …).
//
// lm_head.weight is not written. HF ties it to transformer.wte.weight when
// tie_word_embeddings is true (GPT2LMHeadModel lists it in _tied_weights_keys), its own
// save_pretrained drops it from safetensors (the format refuses shared storage), and the
// Hub's GPT-2 checkpoints omit it; writing it would only add V×C floats that loaders
// discard. On reading it is accepted when it equals wte and refused when it differs.

import type { GptConfig } from "./gpt.ts"
import { gptSpecs, resolveGptConfig } from "./gpt.ts"

export class HfGpt2Error extends Error {
  readonly _tag = "HfGpt2Error"
  override readonly name = "HfGpt2Error"
}

export interface HfTensor {
  readonly name: string
  readonly shape: readonly number[]
  readonly data: Float32Array
}

/** The safetensors metadata transformers requires: from_pretrained refuses a safetensors
 *  file whose __metadata__.format is not one of "pt", "tf", "flax", "mlx". */
export const HF_GPT2_METADATA: Readonly<Record<string, string>> = { format: "pt" }

const PREFIX = "transformer."

/** Flotilla param name → HF GPT2LMHeadModel state-dict name. */
export const hfGpt2Name = (name: string): string =>
  PREFIX + (name === "wte" || name === "wpe" ? `${name}.weight` : name)

/** GPT-2 attention buffers (the causal mask `attn.bias`, `attn.masked_bias`) that older
 *  transformers versions saved with the weights; they are not parameters. Usable as
 *  decodeSafetensors' `skip` (some writers store them as BOOL or U8). */
export const isHfGpt2Buffer = (name: string): boolean => /(^|\.)h\.\d+\.attn\.(bias|masked_bias)$/.test(name)

const sameShape = (a: readonly number[], b: readonly number[]): boolean =>
  a.length === b.length && a.every((d, i) => d === b[i])

/** Flotilla GPT params → HF GPT-2 tensors, in gpt.ts's spec order. The data arrays are the
 *  params' own (not copied). Throws HfGpt2Error when params do not match the config. */
export const toHfGpt2 = (params: ReadonlyMap<string, Float32Array>, config: GptConfig): HfTensor[] => {
  const specs = gptSpecs(resolveGptConfig(config))
  const known = new Set(specs.map((s) => s.name))
  const extra = [...params.keys()].filter((k) => !known.has(k))
  if (extra.length > 0) throw new HfGpt2Error(`hf-gpt2 export: parameters not in this GPT config: ${extra.join(", ")}`)
  return specs.map((s) => {
    const data = params.get(s.name)
    if (data === undefined) throw new HfGpt2Error(`hf-gpt2 export: missing parameter "${s.name}"`)
    const n = s.shape.reduce((a, b) => a * b, 1)
    if (data.length !== n) {
      throw new HfGpt2Error(`hf-gpt2 export: parameter "${s.name}" has ${data.length} values, shape [${s.shape}] needs ${n}`)
    }
    return { name: hfGpt2Name(s.name), shape: [...s.shape], data }
  })
}

/** HF state-dict name → Flotilla name, or undefined when it is not a GPT-2 body param.
 *  Accepts `transformer.`-prefixed names (GPT2LMHeadModel) and bare ones (GPT2Model, the
 *  Hub's original gpt2 checkpoint, nanoGPT-style exporters). */
const flotillaName = (hf: string): string | undefined => {
  const bare = hf.startsWith(PREFIX) ? hf.slice(PREFIX.length) : hf
  if (bare === "wte.weight") return "wte"
  if (bare === "wpe.weight") return "wpe"
  if (/^(h\.\d+\.(ln_[12]|attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)|ln_f)\.(weight|bias)$/.test(bare)) return bare
  return undefined
}

/**
 * HF GPT-2 tensors (decodeSafetensors' result, or any name → {shape, data}) → Flotilla
 * params. The GPT shape (V, C, contextLength, layers) is read off the tensors and every
 * parameter is checked against it; with `config`, also against that. Attention buffers are
 * ignored; lm_head.weight is ignored when it equals wte and an error when it differs.
 * Anything else unrecognised is an error (it is some other model). Data is not copied.
 */
export const fromHfGpt2 = (
  tensors: ReadonlyMap<string, { readonly shape: readonly number[]; readonly data: Float32Array }>,
  config?: GptConfig
): Map<string, Float32Array> => {
  const out = new Map<string, Float32Array>()
  const shapes = new Map<string, readonly number[]>()
  const from = new Map<string, string>()
  const unknown: string[] = []
  let lmHead: { readonly shape: readonly number[]; readonly data: Float32Array } | undefined
  for (const [name, t] of tensors) {
    if (isHfGpt2Buffer(name)) continue
    if (name === "lm_head.weight") {
      lmHead = t
      continue
    }
    const f = flotillaName(name)
    if (f === undefined) {
      unknown.push(name)
      continue
    }
    if (from.has(f)) throw new HfGpt2Error(`hf-gpt2 import: "${name}" and "${from.get(f)}" are both ${f}`)
    from.set(f, name)
    out.set(f, t.data)
    shapes.set(f, t.shape)
  }
  if (unknown.length > 0) {
    throw new HfGpt2Error(`hf-gpt2 import: not GPT-2 parameters: ${unknown.slice(0, 8).join(", ")}${unknown.length > 8 ? ", …" : ""}`)
  }
  const wte = shapes.get("wte")
  const wpe = shapes.get("wpe")
  if (wte === undefined || wte.length !== 2) throw new HfGpt2Error("hf-gpt2 import: no wte.weight [vocab, width] (transformer.wte.weight)")
  if (wpe === undefined || wpe.length !== 2) throw new HfGpt2Error("hf-gpt2 import: no wpe.weight [positions, width] (transformer.wpe.weight)")
  const layers = new Set([...out.keys()].filter((k) => k.startsWith("h.")).map((k) => Number(k.split(".")[1]))).size
  const found = { vocabSize: wte[0], width: wte[1], contextLength: wpe[0], layers }
  if (config !== undefined) {
    for (const k of ["vocabSize", "width", "contextLength", "layers"] as const) {
      if (config[k] !== found[k]) throw new HfGpt2Error(`hf-gpt2 import: the tensors have ${k} ${found[k]}, the config says ${config[k]}`)
    }
  }
  // heads do not change any shape; 1 divides every width
  for (const s of gptSpecs({ ...found, heads: 1, dropout: 0 })) {
    const shape = shapes.get(s.name)
    if (shape === undefined) throw new HfGpt2Error(`hf-gpt2 import: missing ${hfGpt2Name(s.name)} (a ${layers}-layer GPT-2 needs it)`)
    if (!sameShape(shape, s.shape)) {
      throw new HfGpt2Error(`hf-gpt2 import: ${from.get(s.name)} has shape [${shape}], expected [${s.shape}]`)
    }
    const data = out.get(s.name)!
    if (data.length !== s.shape.reduce((a, b) => a * b, 1)) throw new HfGpt2Error(`hf-gpt2 import: ${from.get(s.name)} has ${data.length} values for shape [${shape}]`)
    shapes.delete(s.name)
  }
  if (shapes.size > 0) throw new HfGpt2Error(`hf-gpt2 import: layers are not numbered 0..${layers - 1}: ${[...shapes.keys()].join(", ")}`)
  if (lmHead !== undefined) {
    const w = out.get("wte")!
    let diff = sameShape(lmHead.shape, wte) ? 0 : Infinity
    for (let i = 0; i < w.length && diff !== Infinity; i++) diff = Math.max(diff, Math.abs(lmHead.data[i] - w[i]))
    if (diff !== 0) {
      throw new HfGpt2Error(
        `hf-gpt2 import: lm_head.weight differs from wte.weight (${diff === Infinity ? `shape [${lmHead.shape}]` : `max |diff| ${diff}`}): ` +
          "Flotilla's output head is tied to the token embedding, so an untied head cannot be loaded"
      )
    }
  }
  return out
}

/** config.json for GPT2LMHeadModel. */
export interface HfGpt2Config {
  readonly architectures: readonly string[]
  readonly model_type: "gpt2"
  readonly vocab_size: number
  readonly n_positions: number
  readonly n_ctx: number
  readonly n_embd: number
  readonly n_layer: number
  readonly n_head: number
  readonly activation_function: "gelu_new"
  readonly layer_norm_epsilon: number
  readonly resid_pdrop: number
  readonly embd_pdrop: number
  readonly attn_pdrop: number
  readonly initializer_range: number
  readonly scale_attn_weights: boolean
  readonly scale_attn_by_inverse_layer_idx: boolean
  readonly reorder_and_upcast_attn: boolean
  readonly tie_word_embeddings: boolean
  readonly bos_token_id: number | null
  readonly eos_token_id: number | null
  readonly torch_dtype: "float32"
}

/** The config.json that makes transformers compute exactly Flotilla's GPT. */
export const hfGpt2Config = (config: GptConfig): HfGpt2Config => {
  const c = resolveGptConfig(config)
  return {
    architectures: ["GPT2LMHeadModel"],
    model_type: "gpt2",
    vocab_size: c.vocabSize,
    n_positions: c.contextLength,
    n_ctx: c.contextLength, // deprecated alias older transformers versions read
    n_embd: c.width,
    n_layer: c.layers,
    n_head: c.heads,
    activation_function: "gelu_new", // the tanh approximation, as shared/compute/ops.ts gelu
    layer_norm_epsilon: 1e-5,
    resid_pdrop: 0, // Flotilla trains without dropout
    embd_pdrop: 0,
    attn_pdrop: 0,
    initializer_range: 0.02,
    scale_attn_weights: true, // 1/sqrt(head size)
    scale_attn_by_inverse_layer_idx: false,
    reorder_and_upcast_attn: false,
    tie_word_embeddings: true,
    // absent, GPT2Config defaults both to 50256 (GPT-2's <|endoftext|>), out of range for a
    // byte-level vocabulary; Flotilla's corpora have no special tokens
    bos_token_id: null,
    eos_token_id: null,
    torch_dtype: "float32"
  }
}

/** A GPT-2 config.json (parsed) → GptConfig. Fields transformers defaults (activation,
 *  eps, tying, attention scaling) may be absent; when present they must be what Flotilla
 *  computes. Throws HfGpt2Error naming the field. */
export const gptConfigFromHf = (json: unknown): GptConfig => {
  const fail = (message: string): never => {
    throw new HfGpt2Error(`GPT-2 config.json: ${message}`)
  }
  if (typeof json !== "object" || json === null || Array.isArray(json)) return fail("not a JSON object")
  const j = json as Record<string, unknown>
  if (j.model_type !== "gpt2") fail(`model_type is ${JSON.stringify(j.model_type)}, expected "gpt2"`)
  const int = (key: string, fallback?: string): number => {
    const v = j[key] ?? (fallback === undefined ? undefined : j[fallback])
    if (v === undefined || v === null) fail(`missing ${key}${fallback === undefined ? "" : ` (or ${fallback})`}`)
    if (typeof v !== "number" || !Number.isInteger(v) || v < 1) fail(`${key} is ${JSON.stringify(v)}, expected a positive integer`)
    return v as number
  }
  const must = (key: string, ok: (v: unknown) => boolean, why: string): void => {
    if (j[key] !== undefined && j[key] !== null && !ok(j[key])) fail(`${key} is ${JSON.stringify(j[key])}: ${why}`)
  }
  const width = int("n_embd")
  must("activation_function", (v) => v === "gelu_new" || v === "gelu_pytorch_tanh", 'Flotilla computes GELU\'s tanh form only ("gelu_new")')
  must("layer_norm_epsilon", (v) => v === 1e-5, "Flotilla's LayerNorm uses eps 1e-5")
  must("tie_word_embeddings", (v) => v === true, "Flotilla's output head is tied to the token embedding")
  must("scale_attn_weights", (v) => v === true, "Flotilla scales attention by 1/sqrt(head size)")
  must("scale_attn_by_inverse_layer_idx", (v) => v === false, "Flotilla does not scale attention by layer")
  must("add_cross_attention", (v) => v === false, "Flotilla's GPT has no cross-attention")
  must("n_inner", (v) => v === 4 * width, `Flotilla's MLP is 4 × n_embd = ${4 * width} wide`)
  try {
    return resolveGptConfig({
      vocabSize: int("vocab_size"),
      contextLength: int("n_positions", "n_ctx"),
      layers: int("n_layer"),
      heads: int("n_head"),
      width,
      dropout: 0 // pdrops only matter in training, and Flotilla has no dropout
    })
  } catch (e) {
    return fail(e instanceof Error ? e.message : String(e))
  }
}
