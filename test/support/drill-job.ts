// Implements: the fault drills' job (test/faults/*.test.ts, through test/support/faults.ts):
// a tiny GPT (1 layer, width 16, context 16) on a generated corpus of 25 batches an epoch,
// heartbeat 200 ms, and the spec a drill gives (workers, shards, steps, pipeline stages,
// timeouts, train and optimizer overrides).
import { writeFileSync } from "node:fs"
import { join } from "node:path"

export interface DrillSpec {
  readonly job: string
  readonly workers: number
  readonly psShards: number
  readonly steps: number
  /** default 0 (checkpoint only on stop). */
  readonly checkpointEvery?: number
  readonly leaseTimeoutMs?: number
  readonly livenessMs?: number
  readonly accumulate?: number
  /** pipeline: stages per replica and micro-batches per step (each worker is then a replica of `stages` stage workers). */
  readonly stages?: number
  readonly microBatches?: number
  /** merged over the train block. */
  readonly train?: Record<string, unknown>
  /** the optimizer block (default: the job default, AdamW). */
  readonly optimizer?: Record<string, unknown>
}

const T_CONTEXT = 16
const BATCH = 4
const CORPUS_BYTES = 1_601 // 100 windows of 16 tokens: 25 batches of 4 an epoch

/** ~1.6 kB of generated text (the same as test/dp.kill.test.ts). */
export const drillCorpus = (): string => {
  const words = ["the", "whale", "sea", "ship", "captain", "harpoon", "deck", "wind", "sail", "white", "line", "boat"]
  let x = 12345
  let out = ""
  while (out.length < CORPUS_BYTES) {
    x = (x * 1103515245 + 12345) >>> 0
    out += words[x % words.length] + ((x >>> 8) % 9 === 0 ? ".\n" : " ")
  }
  return out.slice(0, CORPUS_BYTES)
}

/** Batches per epoch of the drill corpus (the loader's plan: valFraction 0). */
export const DRILL_EPOCH_BATCHES = Math.floor(Math.floor((CORPUS_BYTES - 1) / T_CONTEXT) / BATCH)

export const drillPatch = (spec: DrillSpec) => (dir: string): Record<string, unknown> => {
  const corpus = join(dir, "corpus.txt")
  writeFileSync(corpus, drillCorpus())
  return {
    job: spec.job,
    model: { kind: "gpt", vocabSize: 256, contextLength: T_CONTEXT, layers: 1, heads: 2, width: 16 },
    data: { corpus, batchSize: BATCH, valFraction: 0, valBatches: 1 },
    train: {
      steps: spec.steps,
      accumulate: spec.accumulate ?? 1,
      evalEvery: 0,
      checkpointEvery: spec.checkpointEvery ?? 0,
      heartbeatMs: 200,
      livenessMs: spec.livenessMs ?? 2_000,
      leaseTimeoutMs: spec.leaseTimeoutMs ?? 5_000,
      ...spec.train
    },
    schedule: { kind: "constant", lr: 3e-3 },
    ...(spec.optimizer ? { optimizer: spec.optimizer } : {}),
    topology: { workers: spec.workers, psShards: spec.psShards, ...(spec.stages ? { stages: spec.stages, microBatches: spec.microBatches ?? spec.stages } : {}) }
  }
}

