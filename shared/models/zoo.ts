/**
 * Implements: the job's model block → a ModelDef (the one place model kinds are named), and
 * which of its tensors a job trains (`train.freeze`, `train.lora`).
 */
import type { GptModel, JobConfig, LstmModel } from "../config/job.ts"
import { makeGpt, type GptConfig } from "./gpt.ts"
import { loraTrainable } from "./lora.ts"
import { makeLstmClassifier } from "./lstm-classifier.ts"
import type { ModelDef } from "./model.ts"
import { matchesAny, unmatched } from "./patterns.ts"

export const makeModel = (m: GptModel | LstmModel, lora?: JobConfig["train"]["lora"]): ModelDef => {
  switch (m.kind) {
    case "gpt":
      return makeGpt({
        vocabSize: m.vocabSize, contextLength: m.contextLength, layers: m.layers, heads: m.heads, width: m.width,
        ...(lora ? { lora: { rank: lora.rank, alpha: lora.alpha, targets: lora.targets } } : {})
      })
    case "lstm-classifier":
      if (lora) throw new Error("train.lora: LoRA adapts the GPT's linear layers; model.kind lstm-classifier has none (freeze layers instead)")
      return makeLstmClassifier({ vocabSize: m.vocabSize, embedDim: m.embedDim, hidden: m.hidden, dense: m.dense, maxLen: m.maxLen, maskPadding: m.maskPadding })
  }
}

/** The job's model: its model block, with LoRA adapters when train.lora says so. */
export const modelForJob = (job: Pick<JobConfig, "model" | "train">): ModelDef => makeModel(job.model, job.train.lora)

/**
 * The tensors a job trains, in spec order: with LoRA the adapters only, else every tensor;
 * less those `train.freeze` matches. The rest keep their initial (or `init.from`) values.
 */
export const trainableNames = (job: Pick<JobConfig, "model" | "train">, def: ModelDef = modelForJob(job)): string[] => {
  const lora = job.train.lora && def.kind === "gpt" ? new Set(loraTrainable(def.config as GptConfig)) : undefined
  const names = def.specs.map((s) => s.name)
  const typos = unmatched(names, job.train.freeze)
  if (typos.length > 0) throw new Error(`train.freeze: ${typos.map((t) => JSON.stringify(t)).join(", ")} match${typos.length === 1 ? "es" : ""} no tensor of model ${def.kind} (its tensors: ${names.slice(0, 6).join(", ")}, …)`)
  const out = names.filter((n) => (lora ? lora.has(n) : true) && !matchesAny(n, job.train.freeze))
  if (out.length === 0) throw new Error(`train.freeze freezes every tensor of model ${def.kind}: nothing would train`)
  return out
}
