/**
 * Implements: starting from pretrained weights (`init.from` in a job) — reading them and
 * checking them against the model.
 *
 * Sources:
 *   - a Flotilla checkpoint file (`…/ps-0/v00000600.ckpt`) or a job's checkpoint folder
 *     (`checkpoints/<job>`: the newest version every shard holds); a job trained with
 *     several shards keeps part of its params in each `ps-<k>`, so every shard at that
 *     version is read and merged (`resolveCheckpointFiles`);
 *   - a `.safetensors` file: Flotilla's own names, or Hugging Face GPT-2's
 *     (`transformer.h.0.attn.c_attn.weight`, …; shared/models/hf-gpt2.ts);
 *   - `store:<job>[@<version>]`: that job's checkpoints in this job's checkpoint store
 *     (files or JetStream), so a fine-tune on another host finds its weights there.
 * `applyInit` checks names and shapes and lists every difference in one error: a tensor the
 * model has that the weights lack (unless `allowMissing` matches it, or it is a LoRA
 * adapter: those always start fresh), one the weights have that the model lacks (unless
 * `ignore` matches it), and one whose shape differs. Optimizer state is taken only with
 * `init.optimizer: true`, and only from Flotilla checkpoints.
 * Does not own: the checkpoint byte layout (checkpoint.ts), safetensors (shared/checkpoint).
 */
import { existsSync, readdirSync, readFileSync, statSync } from "node:fs"
import { basename, dirname, join } from "node:path"
import { Effect } from "effect"
import { CKPT_NAME, checkpointFileName, type CheckpointRef, type CheckpointStoreShape } from "../../shared/checkpoint/store.ts"
import { decodeSafetensors } from "../../shared/checkpoint/safetensors.ts"
import type { InitFrom } from "../../shared/config/job.ts"
import { fromHfGpt2, isHfGpt2Buffer } from "../../shared/models/hf-gpt2.ts"
import { sizeOf, type ModelDef } from "../../shared/models/model.ts"
import { matchesAny } from "../../shared/models/patterns.ts"
import { isLoraParam } from "../../shared/models/lora.ts"
import type { OptimizerSlots } from "../../shared/optim/optimizers.ts"
import { decodeCheckpoint, type ShardCheckpoint } from "./checkpoint.ts"

export class InitError extends Error {
  readonly _tag = "InitError"
}

export interface InitWeights {
  /** where they came from, for the log */
  readonly from: string
  readonly params: Map<string, Float32Array>
  /** shapes where the source says them */
  readonly shapes: Map<string, readonly number[]>
  /** optimizer slots (Flotilla checkpoints only) */
  readonly slots?: Map<string, OptimizerSlots>
  /** the source's version (checkpoints) */
  readonly version?: number
  /** shard 0's `data` (model block, labels, tokenizer), for checkpoints */
  readonly data?: unknown
}

const versionsIn = (dir: string): number[] =>
  existsSync(dir) ? readdirSync(dir).flatMap((f) => { const m = CKPT_NAME.exec(f); return m ? [Number(m[1])] : [] }) : []

/** The checkpoint files to read (one per shard) for a file or a job's checkpoint folder. */
export const resolveCheckpointFiles = (spec: string): { readonly version: number; readonly files: readonly string[] } => {
  if (!existsSync(spec)) throw new InitError(`checkpoint ${spec} does not exist (give a .ckpt file or a job's checkpoint folder, e.g. checkpoints/<job>)`)
  const isFile = statSync(spec).isFile()
  const m = isFile ? CKPT_NAME.exec(basename(spec)) : null
  // a file outside a store's ps-<k> folders (merge-lora's output, a copied checkpoint): all one shard
  if (isFile && !/^ps-\d+$/.test(basename(dirname(spec)))) return { version: m ? Number(m[1]) : 0, files: [spec] }
  if (isFile && !m) throw new InitError(`checkpoint ${spec}: not a checkpoint file name (v<version>.ckpt)`)
  const jobDir = isFile ? dirname(dirname(spec)) : spec
  const shards = readdirSync(jobDir).flatMap((d) => { const s = /^ps-(\d+)$/.exec(d); return s ? [Number(s[1])] : [] }).sort((a, b) => a - b)
  if (shards.length === 0) throw new InitError(`checkpoint folder ${jobDir} holds no ps-<shard> folders`)
  if (shards[0] !== 0 || shards[shards.length - 1] !== shards.length - 1) throw new InitError(`checkpoint folder ${jobDir}: shards ${shards.join(", ")} are not 0..${shards.length - 1}`)
  let version: number
  if (m) version = Number(m[1])
  else {
    const held = shards.map((k) => new Set(versionsIn(join(jobDir, `ps-${k}`))))
    const all = [...held[0]].filter((v) => held.every((h) => h.has(v))).sort((a, b) => a - b)
    if (all.length === 0) throw new InitError(`checkpoint folder ${jobDir}: no version is held by every shard (${shards.map((k) => `ps-${k}`).join(", ")})`)
    version = all[all.length - 1]
  }
  const files = shards.map((k) => {
    const f = join(jobDir, `ps-${k}`, checkpointFileName(version))
    if (!existsSync(f)) throw new InitError(`shard ${k} has no checkpoint at version ${version} (${f}); the params are split over ${shards.length} shards`)
    return f
  })
  return { version, files }
}

/** Shards' checkpoints of one version as one set of weights. */
export const mergeShards = (from: string, cks: readonly ShardCheckpoint[]): InitWeights => {
  const params = new Map<string, Float32Array>()
  const shapes = new Map<string, readonly number[]>()
  const slots = new Map<string, OptimizerSlots>()
  for (const c of cks) {
    for (const [k, v] of c.params) params.set(k, v)
    for (const [k, v] of c.shapes) shapes.set(k, v)
    for (const [k, v] of c.slots) slots.set(k, v)
  }
  return { from, params, shapes, slots, version: cks[0]?.version, data: cks[0]?.data }
}

const readCheckpointFiles = (spec: string): InitWeights => {
  const { files } = resolveCheckpointFiles(spec)
  return mergeShards(
    files.length === 1 ? files[0] : `${files.join(", ")}`,
    files.map((f) => {
      try {
        return decodeCheckpoint(new Uint8Array(readFileSync(f)), f)
      } catch (e) {
        throw new InitError(`${f}: ${(e as Error).message}`)
      }
    })
  )
}

const readSafetensorsFile = (file: string): InitWeights => {
  let bytes: Uint8Array
  try {
    bytes = new Uint8Array(readFileSync(file))
  } catch (e) {
    throw new InitError(`init.from ${file}: ${(e as Error).message}`)
  }
  const st = decodeSafetensors(bytes, file, { skip: isHfGpt2Buffer })
  const names = [...st.tensors.keys()]
  // Hugging Face GPT-2 names (transformer.h.0.…, or bare wte.weight / h.0.attn.c_attn.weight): mapped; else Flotilla's own
  const hf = names.some((n) => n.startsWith("transformer.") || n === "wte.weight")
  if (hf) {
    const params = fromHfGpt2(new Map([...st.tensors].map(([k, t]) => [k, { shape: t.shape, data: t.data }])))
    const shapes = new Map<string, readonly number[]>()
    for (const [k, t] of st.tensors) {
      const name = k.replace(/^transformer\./, "").replace(/^(wte|wpe)\.weight$/, "$1")
      if (params.has(name)) shapes.set(name, t.shape)
    }
    return { from: `${file} (Hugging Face GPT-2 names)`, params, shapes }
  }
  return { from: file, params: new Map([...st.tensors].map(([k, t]) => [k, t.data])), shapes: new Map([...st.tensors].map(([k, t]) => [k, t.shape])) }
}

const readFromStore = (store: CheckpointStoreShape, job: string, atMost: number): Effect.Effect<InitWeights, Error> =>
  Effect.gen(function* () {
    const lists: Array<ReadonlyArray<CheckpointRef>> = []
    for (let k = 0; k < 256; k++) {
      const refs = yield* store.list(job, k).pipe(Effect.mapError((e) => new InitError(`init.from store:${job}: ${e.message}`)))
      if (refs.length === 0) break
      lists.push(refs)
    }
    if (lists.length === 0) return yield* Effect.fail(new InitError(`init.from store:${job}: the checkpoint store has no checkpoints of job ${job}`))
    const common = [...new Set(lists[0].map((r) => r.version))].filter((v) => v <= atMost && lists.every((l) => l.some((r) => r.version === v))).sort((a, b) => a - b)
    const v = common[common.length - 1]
    if (v === undefined) return yield* Effect.fail(new InitError(`init.from store:${job}: no version${Number.isFinite(atMost) ? ` at or below ${atMost}` : ""} is held by every one of its ${lists.length} shards`))
    const cks: ShardCheckpoint[] = []
    for (const l of lists) {
      const ref = l.find((r) => r.version === v)!
      const bytes = yield* store.load(ref).pipe(Effect.mapError((e) => new InitError(`init.from ${ref.where}: ${e.message}`)))
      cks.push(yield* Effect.try({ try: () => decodeCheckpoint(bytes, ref.where), catch: (e) => new InitError(`init.from ${ref.where}: ${(e as Error).message}`) }))
    }
    return mergeShards(lists.map((l) => l.find((r) => r.version === v)!.where).join(", "), cks)
  })

/** Read the weights `init.from` names. */
export const loadInitWeights = (spec: InitFrom, store: CheckpointStoreShape): Effect.Effect<InitWeights, Error> => {
  const m = /^store:([^@]+)(?:@(\d+))?$/.exec(spec.from)
  if (m) return readFromStore(store, m[1], m[2] === undefined ? Infinity : Number(m[2]))
  return Effect.try({
    try: () => (spec.from.endsWith(".safetensors") ? readSafetensorsFile(spec.from) : readCheckpointFiles(spec.from)),
    catch: (e) => (e instanceof Error ? e : new InitError(String(e)))
  })
}

/**
 * A job's initial params, every tensor: its model's seeded init, or (with `init`) the
 * weights it names checked against the model (LoRA adapters always start fresh), with
 * their optimizer slots when `init.optimizer` asks. What a parameter server starts from,
 * and what `merge-lora` / `export` rebuild a LoRA job's frozen base from.
 */
export const initialWeights = (
  def: ModelDef,
  seed: number,
  init: InitFrom | undefined,
  store: CheckpointStoreShape
): Effect.Effect<{ readonly params: Map<string, Float32Array>; readonly slots?: Map<string, OptimizerSlots>; readonly from?: string }, Error> =>
  Effect.gen(function* () {
    const fresh = def.init(seed)
    if (!init) return { params: fresh }
    const w = yield* loadInitWeights(init, store)
    const adapters = def.specs.filter((s) => isLoraParam(s.name)).map((s) => s.name)
    const params = yield* Effect.try({ try: () => applyInit(def, fresh, w, init, adapters), catch: (e) => (e instanceof Error ? e : new InitError(String(e))) })
    return { params, slots: init.optimizer ? w.slots : undefined, from: `${w.from}${w.version !== undefined ? ` (version ${w.version})` : ""}` }
  })

/**
 * The model's initial params: `fresh` (its seeded init) overwritten by the weights, after
 * checking them. `fresh` is used only for what the weights may lack. Throws an InitError
 * listing every difference.
 */
export const applyInit = (def: ModelDef, fresh: ReadonlyMap<string, Float32Array>, w: InitWeights, spec: InitFrom, alwaysFresh: readonly string[] = []): Map<string, Float32Array> => {
  const ignore = spec.ignore ?? []
  const allow = spec.allowMissing ?? []
  const problems: string[] = []
  const out = new Map<string, Float32Array>()
  for (const s of def.specs) {
    const src = matchesAny(s.name, ignore) ? undefined : w.params.get(s.name)
    if (alwaysFresh.includes(s.name)) {
      out.set(s.name, fresh.get(s.name)!)
      continue
    }
    if (src === undefined) {
      if (matchesAny(s.name, allow)) out.set(s.name, fresh.get(s.name)!)
      else problems.push(`${s.name} [${s.shape}]: missing from the weights (init.allowMissing lets it keep its random init)`)
      continue
    }
    const shape = w.shapes.get(s.name)
    const sameShape = shape ? shape.length === s.shape.length && shape.every((d, i) => d === s.shape[i]) : src.length === sizeOf(s.shape)
    if (!sameShape) {
      problems.push(`${s.name}: the weights have ${shape ? `shape [${shape}]` : `${src.length} values`}, the model [${s.shape}]`)
      continue
    }
    out.set(s.name, src)
  }
  for (const name of w.params.keys()) {
    if (!def.specs.some((s) => s.name === name) && !matchesAny(name, ignore)) problems.push(`${name}: in the weights but not in the model (init.ignore drops it)`)
  }
  if (problems.length > 0) {
    throw new InitError(`init.from ${w.from} does not fit model ${def.kind} (${problems.length} tensor${problems.length === 1 ? "" : "s"}):\n  ${problems.join("\n  ")}`)
  }
  return out
}
