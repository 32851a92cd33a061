/**
 * Implements: `flotilla quantize <checkpoint> --mode int8-dynamic|int8-static|int4-weight
 * [--calib-batches N] [--out FILE] [--job FILE] [--json] [--backend B]` — post-training
 * quantization of a checkpoint: with `--nats URL` by a live quantizer of the checkpoint's
 * job (`flotilla.<job>.quantize`, actors/quantizer/service.ts) when one answers, else in
 * this process; both run quantizeCheckpoint (actors/quantizer/ptq.ts). Progress goes to stderr; stdout gets the report
 * (with --json exactly one JSON object: QuantizeReport).
 * Does not own: quantization, the file format, the evaluation (actors/quantizer/).
 */
import { Effect, Result } from "effect"
import { quantizeCheckpoint, type QuantizeReport, type QuantizeRequest } from "../actors/quantizer/ptq.ts"
import { isQuantMode, QUANT_MODES } from "../actors/quantizer/qmodel.ts"
import { Compute, type BackendPreference } from "../shared/compute/backend.ts"
import { loggingLayer, logLevelFromEnv } from "./runtime.ts"
import { readFileSync } from "node:fs"
import { resolve } from "node:path"
import { QuantizerClient } from "../actors/quantizer/service.ts"
import { decodeCheckpoint } from "../actors/param-server/checkpoint.ts"
import { Bus } from "../shared/bus/Bus.ts"
import { NatsBus, type NatsAuth } from "../shared/bus/nats.ts"

export class QuantizeCliError extends Error {
  readonly _tag = "QuantizeCliError"
}

export interface QuantizeCliOptions {
  readonly checkpoint: string
  readonly mode?: string
  readonly calibBatches?: string
  readonly out?: string
  readonly job?: string
  readonly json: boolean
  readonly backend?: BackendPreference
  /** ask a live quantizer on these NATS servers first (embedded when none answers). */
  readonly nats?: string
  /** its credentials (cli/auth.ts): the job's operator role may ask `quantize`. */
  readonly auth?: NatsAuth
}

/** The request the options say, or a QuantizeCliError naming the bad option. */
export const requestFromOptions = (o: QuantizeCliOptions): QuantizeRequest => {
  if (o.mode === undefined) throw new QuantizeCliError(`give --mode ${QUANT_MODES.join("|")}`)
  if (!isQuantMode(o.mode)) throw new QuantizeCliError(`--mode must be one of ${QUANT_MODES.join(", ")}, got ${JSON.stringify(o.mode)}`)
  let calibBatches: number | undefined
  if (o.calibBatches !== undefined) {
    calibBatches = Number(o.calibBatches)
    if (!Number.isInteger(calibBatches) || calibBatches < 1) throw new QuantizeCliError(`--calib-batches must be a positive integer, got ${JSON.stringify(o.calibBatches)}`)
    if (o.mode !== "int8-static") throw new QuantizeCliError(`--calib-batches is for --mode int8-static (${o.mode} calibrates nothing)`)
  }
  return { checkpoint: o.checkpoint, mode: o.mode, ...(calibBatches ? { calibBatches } : {}), ...(o.out ? { out: o.out } : {}), ...(o.job ? { jobFile: o.job } : {}) }
}

const pct = (x: number) => `${x >= 0 ? "+" : ""}${(100 * x).toFixed(2)}%`
const bytes = (n: number) => `${n.toLocaleString("en")} B`

/** The report for people. */
export const formatReport = (r: QuantizeReport): string => {
  const lines = [
    `quantized ${r.checkpoint} (job ${r.job}, version ${r.version}, ${r.model}) → ${r.out}`,
    `  mode      ${r.mode}${r.mode === "int4-weight" ? ` (groups of ${r.groupSize})` : ""}${r.mode === "int8-static" ? ` (calibrated on ${r.calibBatches} training batches)` : ""}; tensors ${r.tensors.int8 + r.tensors.int4} quantized, ${r.tensors.float32} float32`,
    `  size      ${bytes(r.fp32Bytes)} fp32 → ${bytes(r.quantBytes)} file (header ${bytes(r.headerBytes)}): ${r.sizeRatio.toFixed(2)}× smaller; the quantized weights alone ${r.weightSizeRatio.toFixed(2)}×`,
    `  val loss  fp32 ${r.fp32ValLoss.toFixed(4)}   quantized ${r.quantValLoss.toFixed(4)}   Δ ${r.lossDelta >= 0 ? "+" : ""}${r.lossDelta.toFixed(4)} (${pct(r.lossDeltaRel)})   on ${r.valBatches} validation batches (${r.valSamples} rows)`
  ]
  if (r.fp32Accuracy !== undefined && r.quantAccuracy !== undefined && r.accuracyDelta !== undefined) {
    lines.push(`  accuracy  fp32 ${(100 * r.fp32Accuracy).toFixed(2)}%   quantized ${(100 * r.quantAccuracy).toFixed(2)}%   Δ ${(100 * r.accuracyDelta).toFixed(2)} points`)
  }
  lines.push(`  data      ${r.jobSource}`, `  took      ${r.seconds.toFixed(1)} s`)
  return lines.join("\n") + "\n"
}

/**
 * With `--nats URL`: ask a live quantizer of the checkpoint's job (`flotilla launch
 * quantizer`; paths are as its host sees them). Undefined when none answers.
 */
const viaQuantizer = async (o: QuantizeCliOptions, req: QuantizeRequest): Promise<Result.Result<QuantizeReport, { readonly message: string }> | undefined> => {
  if (!o.nats) return undefined
  let job: string
  try {
    job = decodeCheckpoint(new Uint8Array(readFileSync(o.checkpoint)), o.checkpoint).job
  } catch {
    return undefined // not readable here: the embedded run says why
  }
  const program = Effect.gen(function* () {
    const bus = yield* Bus
    return yield* QuantizerClient.quantize(bus, job, { ...req, checkpoint: resolve(req.checkpoint), ...(req.out ? { out: resolve(req.out) } : {}) })
  }).pipe(
    Effect.scoped,
    Effect.provide(NatsBus.layer({ servers: o.nats.split(","), name: "flotilla-quantize", connectTimeoutMs: 3_000, auth: o.auth })),
    Effect.provide(loggingLayer(logLevelFromEnv("Warn"))),
    Effect.result
  )
  const r = await Effect.runPromise(program)
  if (Result.isSuccess(r)) return r
  const e = r.failure as { _tag?: string; message?: string }
  if (e._tag === "NoRespondersError" || e._tag === "BusConnectionError" || e._tag === "BusTimeoutError") {
    process.stderr.write(`no quantizer of job ${job} answered on ${o.nats}${e._tag === "BusConnectionError" ? ` (${e.message})` : ""}: quantizing here\n`)
    return undefined
  }
  return r
}

export const quantizeMain = async (o: QuantizeCliOptions): Promise<void> => {
  const req = requestFromOptions(o)
  const program = quantizeCheckpoint(req, (line) => void process.stderr.write(line + "\n")).pipe(
    Effect.provide(Compute.layer(o.backend)),
    Effect.provide(loggingLayer(logLevelFromEnv("Warn"))),
    Effect.result
  )
  const r: Result.Result<QuantizeReport, { readonly message: string }> = (await viaQuantizer(o, req)) ?? (await Effect.runPromise(program))
  if (Result.isFailure(r)) throw new QuantizeCliError(`quantize ${o.checkpoint}: ${r.failure.message}`)
  process.stdout.write(o.json ? JSON.stringify(r.success) + "\n" : formatReport(r.success))
}
