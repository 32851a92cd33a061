/**
 * Implements: the job's model block → a ModelDef (the one place model kinds are named).
 */
import type { GptModel, LstmModel } from "../config/job.ts"
import { makeGpt, type GptDef } from "./gpt.ts"

export const makeModel = (m: GptModel | LstmModel): GptDef => {
  if (m.kind !== "gpt") {
    throw new Error(`model.kind ${m.kind}: the data-parallel actors train language models (kind "gpt") for now`)
  }
  return makeGpt({ vocabSize: m.vocabSize, contextLength: m.contextLength, layers: m.layers, heads: m.heads, width: m.width })
}
