/**
 * Implements: `flotilla export <checkpoint> --safetensors out.safetensors` and
 * `flotilla merge-lora <checkpoint> --out <file>` — a trained model out of Flotilla's
 * checkpoint format.
 *
 * Both read a checkpoint file or a job's checkpoint folder (every shard at one version,
 * actors/param-server/init.ts), and rebuild the whole model from shard 0's `data` (the
 * model block, LoRA config, init source, seed): a LoRA job's checkpoints hold only the
 * adapters, so its frozen base is rebuilt from its `init.from` (or its seeded init) and the
 * adapters are merged in (W + (alpha/r)·A·B, shared/models/lora.ts).
 *   export      safetensors (F32). A GPT is written with Hugging Face GPT-2's names and
 *               layout (`transformer.h.0.attn.c_attn.weight`, …; the head is tied, so no
 *               lm_head) and a `config.json` for GPT2LMHeadModel beside the file; any other
 *               model with Flotilla's names and a `config.json` holding its model block.
 *   merge-lora  the merged weights: `.safetensors` (as export) or a Flotilla checkpoint
 *               (`.ckpt`, usable by init.from, classify and generate).
 * Does not own: the formats (shared/checkpoint/safetensors.ts, checkpoint.ts), the mapping
 * to GPT-2 names (shared/models/hf-gpt2.ts).
 */
import { mkdirSync, readFileSync, writeFileSync } from "node:fs"
import { dirname, join } from "node:path"
import { Effect, Result } from "effect"
import { decodeCheckpoint, encodeCheckpoint, type ShardCheckpoint } from "../actors/param-server/checkpoint.ts"
import { initialWeights, mergeShards, resolveCheckpointFiles } from "../actors/param-server/init.ts"
import { makeFileStore } from "../shared/checkpoint/store.ts"
import { encodeSafetensors } from "../shared/checkpoint/safetensors.ts"
import { GptModel, InitFrom, Lora, LstmModel } from "../shared/config/job.ts"
import type { GptConfig } from "../shared/models/gpt.ts"
import { HF_GPT2_METADATA, hfGpt2Config, toHfGpt2 } from "../shared/models/hf-gpt2.ts"
import { mergeLora, withoutLora } from "../shared/models/lora.ts"
import type { ModelDef } from "../shared/models/model.ts"
import { makeModel } from "../shared/models/zoo.ts"
import { decodeValue } from "../shared/protocol/decode.ts"
import { Schema } from "effect"

export class ExportError extends Error {
  readonly _tag = "ExportError"
}

export interface Trained {
  /** the model the params are for (with adapters when `lora`) */
  readonly def: ModelDef
  readonly params: Map<string, Float32Array>
  readonly lora?: Lora
  readonly version: number
  readonly first: ShardCheckpoint
  /** the checkpoint files read, shard 0 first */
  readonly files: readonly string[]
}

const Data = Schema.Struct({
  model: Schema.Union([GptModel, LstmModel]),
  lora: Schema.optional(Lora),
  init: Schema.optional(InitFrom),
  seed: Schema.optional(Schema.Number)
})

/** A checkpoint's whole model: every shard merged, a LoRA job's base rebuilt from its init. */
export const loadTrained = async (spec: string, checkpointDir = "checkpoints"): Promise<Trained> => {
  let resolved: ReturnType<typeof resolveCheckpointFiles>
  try {
    resolved = resolveCheckpointFiles(spec)
  } catch (e) {
    throw new ExportError((e as Error).message)
  }
  const cks = resolved.files.map((f) => {
    try {
      return decodeCheckpoint(new Uint8Array(readFileSync(f)), f)
    } catch (e) {
      throw new ExportError((e as Error).message) // it names the file
    }
  })
  const d = decodeValue(Data, resolved.files[0], cks[0].data)
  if (Result.isFailure(d)) throw new ExportError(`${resolved.files[0]}: the checkpoint does not name its model (${d.failure.reason}); it was written before checkpoints carried it`)
  const data = d.success
  const def = makeModel(data.model, data.lora)
  const w = mergeShards(resolved.files.join(", "), cks)
  const params = new Map(w.params)
  if (def.specs.some((s) => !params.has(s.name))) {
    // frozen tensors not in the checkpoint (a LoRA job's base): its init, as its parameter servers rebuild it
    const base = await Effect.runPromise(initialWeights(def, data.seed ?? 0, data.init, makeFileStore(checkpointDir)))
    for (const s of def.specs) if (!params.has(s.name)) params.set(s.name, base.params.get(s.name)!)
  }
  return { def, params, lora: data.lora, version: cks[0].version, first: cks[0], files: resolved.files }
}

/** The model without adapters, and its params with them merged in. */
const merged = (t: Trained): { def: ModelDef; params: Map<string, Float32Array> } => {
  if (!t.lora) return { def: t.def, params: t.params }
  const c = t.def.config as GptConfig
  const params = mergeLora(c, t.params)
  const base = withoutLora(c)
  return { def: makeModel({ kind: "gpt", vocabSize: base.vocabSize, contextLength: base.contextLength, layers: base.layers, heads: base.heads, width: base.width }), params }
}

const writeSafetensors = (def: ModelDef, params: Map<string, Float32Array>, out: string, source: string): { config: string } => {
  mkdirSync(dirname(out), { recursive: true })
  const config = join(dirname(out), "config.json")
  if (def.kind === "gpt") {
    const c = def.config as GptConfig
    writeFileSync(out, encodeSafetensors(toHfGpt2(params, c), { ...HF_GPT2_METADATA, flotilla_source: source }))
    writeFileSync(config, JSON.stringify(hfGpt2Config(c), null, 2) + "\n")
  } else {
    writeFileSync(out, encodeSafetensors(def.specs.map((s) => ({ name: s.name, shape: [...s.shape], data: params.get(s.name)! })), { format: "flotilla", flotilla_source: source }))
    writeFileSync(config, JSON.stringify({ flotilla: def.config }, null, 2) + "\n")
  }
  return { config }
}

export const exportMain = async (o: { checkpoint: string; safetensors?: string; json: boolean }): Promise<void> => {
  if (o.safetensors === undefined) throw new ExportError("flotilla export: give --safetensors <out.safetensors>")
  const t = await loadTrained(o.checkpoint)
  const m = merged(t)
  const { config } = writeSafetensors(m.def, m.params, o.safetensors, `${o.checkpoint}@${t.version}`)
  const n = [...m.params.values()].reduce((k, v) => k + v.length, 0)
  if (o.json) process.stdout.write(JSON.stringify({ checkpoint: o.checkpoint, version: t.version, model: m.def.kind, safetensors: o.safetensors, config, params: n, mergedLora: t.lora !== undefined }) + "\n")
  else process.stdout.write(`wrote ${o.safetensors} (${m.def.kind}, ${n.toLocaleString("en")} params${t.lora ? ", LoRA merged" : ""}${m.def.kind === "gpt" ? ", Hugging Face GPT-2 names" : ""}) and ${config}\n`)
}

export const mergeLoraMain = async (o: { checkpoint: string; out?: string; json: boolean }): Promise<void> => {
  if (o.out === undefined) throw new ExportError("flotilla merge-lora: give --out <file.safetensors | file.ckpt>")
  const t = await loadTrained(o.checkpoint)
  if (!t.lora) throw new ExportError(`${o.checkpoint}: not a LoRA checkpoint (its job has no train.lora)`)
  const m = merged(t)
  if (o.out.endsWith(".safetensors")) writeSafetensors(m.def, m.params, o.out, `${o.checkpoint}@${t.version}`)
  else if (o.out.endsWith(".ckpt")) {
    mkdirSync(dirname(o.out), { recursive: true })
    const data = { ...(t.first.data as object), lora: undefined, init: undefined }
    writeFileSync(o.out, encodeCheckpoint({
      ...t.first, shard: 0, version: t.version, params: m.params, shapes: new Map(m.def.specs.map((s) => [s.name, s.shape])), slots: new Map(), data
    }))
  } else throw new ExportError(`--out ${o.out}: give a .safetensors or a .ckpt file`)
  if (o.json) process.stdout.write(JSON.stringify({ checkpoint: o.checkpoint, version: t.version, out: o.out, lora: t.lora }) + "\n")
  else process.stdout.write(`wrote ${o.out}: ${o.checkpoint} (version ${t.version}) with its rank-${t.lora.rank} adapters merged\n`)
}
