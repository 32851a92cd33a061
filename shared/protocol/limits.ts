/**
 * Implements: the numeric bounds every receiver holds metadata to — the largest learning
 * rate anything applies (MAX_LR), the largest counts a message may carry (MAX_SAMPLES,
 * MAX_COUNT), and the job-dependent check of a gradient push's GradMeta numbers
 * (`gradMetaProblem`: samples ≤ its micro-batches × batchSize, tokens ≤ samples × the
 * model's units per row). The schemas (messages.ts, control.ts) use the static bounds; the
 * parameter server calls `gradMetaProblem` after decoding a push.
 * Does not own: decoding (decode.ts), what a receiver does with a refusal (its actor).
 *
 * Why these numbers:
 *  - MAX_LR = 10: ten times the largest LR any optimizer of the registry is run with in
 *    this project's jobs and tests (SGD at 0.1–1; Adam/AdamW at 1e-4–3e-2); an LR above it
 *    is a typo or an attack (set-lr 1e30 turned every param into NaN in one step). Static,
 *    not per job, so every receiver (controller, control listener, scheduler, parameter
 *    server, the schemas) holds the same line without knowing the job file.
 *  - MAX_SAMPLES = 2^31: a step's sample count is a sum of batch rows; 2^31 leaves every
 *    sum of them exact in float64 and fits the int32 a port would use.
 *  - samples ≤ micro-batches × batchSize: every micro-batch has at most batchSize rows
 *    (a classifier's last is shorter), whoever combines them (accumulation, a pipeline's M
 *    micro-batches, a relay's workers): the batch id names each of them. A larger claim
 *    would weigh a push above the others in the sample-weighted mean.
 */
import type { JobConfig } from "../config/job.ts"

/** The largest learning rate any actor accepts or applies (set-lr, schedules, LR replies, decisions). */
export const MAX_LR = 10

/** The largest sample count a push or a step may claim. */
export const MAX_SAMPLES = 2 ** 31

/** The largest token or byte count a message may carry (float64 integers stay exact below 2^53). */
export const MAX_COUNT = Number.MAX_SAFE_INTEGER

/** An LR that every actor accepts: finite, ≥ 0, ≤ MAX_LR. */
export const lrProblem = (lr: unknown): string | undefined =>
  typeof lr !== "number" || !Number.isFinite(lr) || lr < 0 ? `lr must be a finite number >= 0, got ${String(lr)}`
  : lr > MAX_LR ? `lr ${lr} is above the bound ${MAX_LR} (shared/protocol/limits.ts MAX_LR)`
  : undefined

/** Units (the model's `units`) per batch row: tokens for a GPT, 1 sample for a classifier. */
export const unitsPerRow = (job: JobConfig): number => (job.model.kind === "gpt" ? job.model.contextLength : 1)

/**
 * Why a push's GradMeta numbers cannot be right for this job, or undefined. `micros` is the
 * number of micro-batch ids its batch id names.
 */
export const gradMetaProblem = (job: JobConfig, x: { readonly samples: number; readonly tokens: number }, micros: number): string | undefined => {
  const rows = Math.max(1, micros) * job.data.batchSize
  if (x.samples > rows) return `samples ${x.samples} > ${rows} (${micros} micro-batches of at most ${job.data.batchSize} rows)`
  const units = x.samples * unitsPerRow(job)
  if (x.tokens > units) return `tokens ${x.tokens} > ${units} (${x.samples} rows of at most ${unitsPerRow(job)} units)`
  return undefined
}
