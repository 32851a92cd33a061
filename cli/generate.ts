/**
 * Implements: `flotilla generate <checkpoint|quantized-file> [--prompt TEXT] [--tokens N]
 * [--temperature T] [--top-k K] [--seed S] [--json] [--backend B]` — text from a trained GPT.
 *
 * <checkpoint> is a checkpoint file or a job's checkpoint folder (every shard merged, a
 * LoRA job's adapters folded in: actors/quantizer/ptq.ts floatModel) and runs on its
 * float32 weights (shared/models/gpt.ts generate); a quantized model file (`flotilla
 * quantize`) runs from its int8/int4 weights, each layer dequantized at its use, with the
 * activations its mode says (actors/quantizer/qforward.ts qGenerate). Tokens are bytes
 * (the GPT's vocabulary 256); the output is the prompt followed by the sampled text, or
 * with --json one object { source, format, mode, prompt, tokens, text }.
 * Does not own: the model, sampling (gpt.ts sampleLogits), the file format.
 */
import { floatModel } from "../actors/quantizer/ptq.ts"
import { isQModelFile, readQModelFile } from "../actors/quantizer/qfile.ts"
import { qGenerate } from "../actors/quantizer/qforward.ts"
import { initBackend, type BackendPreference } from "../shared/compute/backend.ts"
import { decodeTokens, encodeText } from "../shared/data/corpus.ts"
import { generate, type GenerateOptions, type GptConfig, type GptDef } from "../shared/models/gpt.ts"
import { loadTrained } from "./export.ts"

export class GenerateError extends Error {
  readonly _tag = "GenerateError"
}

/** Defaults, in one place (those of the sample `flotilla start` prints). */
export const GENERATE_DEFAULTS = { prompt: "\n", tokens: 200, temperature: 0.8, topK: 40, seed: 1337 } as const

export interface GenerateCliOptions {
  readonly source: string
  readonly prompt?: string
  readonly tokens?: string
  readonly temperature?: string
  readonly topK?: string
  readonly seed?: string
  readonly json: boolean
  readonly backend?: BackendPreference
}

const num = (name: string, v: string | undefined, fallback: number, ok: (n: number) => boolean, what: string): number => {
  if (v === undefined) return fallback
  const n = Number(v)
  if (v.trim() === "" || !ok(n)) throw new GenerateError(`--${name} must be ${what}, got ${JSON.stringify(v)}`)
  return n
}

export const generateMain = async (o: GenerateCliOptions): Promise<void> => {
  const n = num("tokens", o.tokens, GENERATE_DEFAULTS.tokens, (x) => Number.isInteger(x) && x >= 1 && x <= 100_000, "an integer in [1, 100000]")
  const options: GenerateOptions = {
    temperature: num("temperature", o.temperature, GENERATE_DEFAULTS.temperature, (x) => Number.isFinite(x) && x >= 0, "a number >= 0 (0 = greedy)"),
    topK: num("top-k", o.topK, GENERATE_DEFAULTS.topK, (x) => Number.isInteger(x) && x >= 0, "an integer >= 0 (0 = all tokens)"),
    seed: num("seed", o.seed, GENERATE_DEFAULTS.seed, (x) => Number.isInteger(x) && x >= 0, "an integer >= 0")
  }
  const promptText = o.prompt ?? GENERATE_DEFAULTS.prompt
  const prompt = encodeText(promptText)
  const quantized = isQModelFile(o.source)
  let run: (p: Int32Array) => Int32Array
  let mode = "float32"
  let config: GptConfig
  if (quantized) {
    let r: ReturnType<typeof readQModelFile>
    try {
      r = readQModelFile(o.source)
    } catch (e) {
      throw new GenerateError((e as Error).message)
    }
    if (r.qm.def.kind !== "gpt") throw new GenerateError(`${o.source}: a quantized ${r.qm.def.kind}, not a GPT (use flotilla classify for a classifier)`)
    const qm = r.qm
    mode = qm.mode
    config = qm.def.config as GptConfig
    run = (p) => qGenerate(qm, p, n, options)
  } else {
    let m: ReturnType<typeof floatModel>
    try {
      m = floatModel(await loadTrained(o.source))
    } catch (e) {
      throw new GenerateError((e as Error).message)
    }
    if (m.def.kind !== "gpt") throw new GenerateError(`${o.source}: a ${m.def.kind} checkpoint, not a GPT (use flotilla classify for a classifier)`)
    const def = m.def as GptDef
    config = def.config
    run = (p) => generate(def, m.params, p, n, options)
  }
  const bad = prompt.findIndex((t) => t >= config.vocabSize)
  if (bad >= 0) throw new GenerateError(`--prompt: byte ${prompt[bad]} at ${bad} is outside the model's vocabulary of ${config.vocabSize}`)
  await initBackend(o.backend)
  const tokens = run(prompt)
  const text = decodeTokens(tokens)
  if (o.json) process.stdout.write(JSON.stringify({ source: o.source, format: quantized ? "quantized" : "checkpoint", mode, prompt: promptText, tokens: Array.from(tokens), text }) + "\n")
  else process.stdout.write(promptText + text + "\n")
}
