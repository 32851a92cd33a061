/**
 * Implements: the job's model block → a ModelDef (the one place model kinds are named).
 */
import type { GptModel, LstmModel } from "../config/job.ts"
import { makeGpt } from "./gpt.ts"
import { makeLstmClassifier } from "./lstm-classifier.ts"
import type { ModelDef } from "./model.ts"

export const makeModel = (m: GptModel | LstmModel): ModelDef => {
  switch (m.kind) {
    case "gpt":
      return makeGpt({ vocabSize: m.vocabSize, contextLength: m.contextLength, layers: m.layers, heads: m.heads, width: m.width })
    case "lstm-classifier":
      return makeLstmClassifier({ vocabSize: m.vocabSize, embedDim: m.embedDim, hidden: m.hidden, dense: m.dense, maxLen: m.maxLen, maskPadding: m.maskPadding })
  }
}
