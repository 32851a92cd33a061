/**
 * Implements: the quantizer's request/reply endpoint — `serveQuantize(job)` answers
 * `flotilla.<job>.quantize` (queue group `quantizer`, so more quantizers share the work)
 * by running `quantizeCheckpoint` (ptq.ts) on the request, and `QuantizerClient.quantize`,
 * what a caller (`flotilla quantize` with a live quantizer) sends and how it reads the reply.
 * Does not own: the PTQ itself (ptq.ts), the actor around it (cli/topology.ts: the
 * `quantizer` role serves this, and relays with `--relay`), subjects (shared/protocol/subjects.ts).
 *
 * Request (JSON): { _tag?: "Quantize", v?: 1, checkpoint, mode, calibBatches?, out?,
 *   jobFile?, groupSize? } — paths as the quantizer's host sees them.
 * Reply (JSON): { _tag: "Quantized", v: 1, report } with ptq.ts QuantizeReport, or
 *   { _tag: "QuantizeFailed", v: 1, error: { code, message } } where code is a
 *   QuantizeFailure ("invalid-request" for a message that does not decode, with the reason).
 * Handlers of one subscription run one at a time: a quantizer does one request at a time,
 * and a request takes seconds to minutes of compute, so callers wait with a long timeout.
 */
import { Effect, Result, Schema } from "effect"
import { Bus, type BusError, type BusShape } from "../../shared/bus/Bus.ts"
import { Compute } from "../../shared/compute/backend.ts"
import { decodeBytes, encodeMessage } from "../../shared/protocol/decode.ts"
import { PROTOCOL_VERSION, queues, subjects } from "../../shared/protocol/subjects.ts"
import { QUANTIZE_FAILURES, quantizeCheckpoint, QuantizeError, type Progress, type QuantizeFailure, type QuantizeReport, type QuantizeRequest } from "./ptq.ts"
import { QUANT_MODES } from "./qmodel.ts"

/** The request subject of a job's quantizers. */
export const quantizeSubject = (job: string): string => subjects(job).quantize
export const QUANTIZER_QUEUE = queues.quantizer
/** How long a client waits for a reply by default: a gpt-mini takes ~10-30 s on 2 cores. */
export const DEFAULT_QUANTIZE_TIMEOUT_MS = 600_000

const PosInt = Schema.Int.check(Schema.isGreaterThan(0))

export const QuantizeMessage = Schema.Struct({
  _tag: Schema.optional(Schema.Literal("Quantize")),
  v: Schema.optional(Schema.Literal(PROTOCOL_VERSION)),
  checkpoint: Schema.String.check(Schema.isMinLength(1)),
  mode: Schema.Literals(QUANT_MODES),
  calibBatches: Schema.optional(PosInt),
  out: Schema.optional(Schema.String.check(Schema.isMinLength(1))),
  jobFile: Schema.optional(Schema.String.check(Schema.isMinLength(1))),
  groupSize: Schema.optional(PosInt)
})

const FAILURES = QUANTIZE_FAILURES

export const QuantizeReply = Schema.Union([
  Schema.Struct({ _tag: Schema.Literal("Quantized"), v: Schema.Literal(PROTOCOL_VERSION), report: Schema.Record(Schema.String, Schema.Unknown) }),
  Schema.Struct({
    _tag: Schema.Literal("QuantizeFailed"),
    v: Schema.Literal(PROTOCOL_VERSION),
    error: Schema.Struct({ code: Schema.Literals(FAILURES), message: Schema.String })
  })
])
export type QuantizeReply = typeof QuantizeReply.Type

const failed = (code: QuantizeFailure, message: string): QuantizeReply => ({ _tag: "QuantizeFailed", v: PROTOCOL_VERSION, error: { code, message } })

/** A request's bytes → the reply to send (never fails: a failure is the reply). */
export const handleQuantize = Effect.fn("Quantizer.handle")(function* (subject: string, data: Uint8Array, progress?: Progress) {
  const req = decodeBytes(QuantizeMessage, subject, data)
  if (Result.isFailure(req)) return failed("invalid-request", req.failure.reason)
  const { _tag: _, v: __, ...fields } = req.success
  return yield* quantizeCheckpoint(fields as QuantizeRequest, progress).pipe(
    Effect.map((report): QuantizeReply => ({ _tag: "Quantized", v: PROTOCOL_VERSION, report: { ...report } })),
    Effect.catchTag("QuantizeError", (e) => Effect.succeed(failed(e.reason, e.message)))
  )
})

/**
 * Serve `flotilla.<job>.quantize` in queue group `quantizer` until the scope closes. The
 * quantizer actor runs this (with Compute provided); progress lines go to the log.
 */
export const serveQuantize = (job: string, opts: { readonly queue?: string } = {}) =>
  Effect.gen(function* () {
    const bus = yield* Bus
    const compute = yield* Compute
    const subject = quantizeSubject(job)
    return yield* bus.subscribe(
      subject,
      (m) =>
        Effect.gen(function* () {
          const lines: string[] = []
          const reply = yield* handleQuantize(m.subject, m.data, (l) => void lines.push(l)).pipe(Effect.provideService(Compute, compute))
          for (const l of lines) yield* Effect.logInfo(l)
          if (reply._tag === "QuantizeFailed") yield* Effect.logWarning(`quantize request failed (${reply.error.code}): ${reply.error.message}`)
          yield* bus.respond(m, encodeMessage(reply))
        }),
      { queue: opts.queue ?? QUANTIZER_QUEUE }
    )
  })

/** What callers use: send a request to a live quantizer of `job` and read its reply. */
export const QuantizerClient = {
  quantize: (bus: BusShape, job: string, req: QuantizeRequest, timeoutMs = DEFAULT_QUANTIZE_TIMEOUT_MS): Effect.Effect<QuantizeReport, QuantizeError | BusError> =>
    bus.request(quantizeSubject(job), encodeMessage({ _tag: "Quantize", v: PROTOCOL_VERSION, ...req }), { timeoutMs }).pipe(
      Effect.flatMap((m) => {
        const r = decodeBytes(QuantizeReply, m.subject, m.data)
        if (Result.isFailure(r)) return Effect.fail(new QuantizeError({ reason: "bad-reply", message: r.failure.message }))
        const reply = r.success
        return reply._tag === "Quantized"
          ? Effect.succeed(reply.report as unknown as QuantizeReport)
          : Effect.fail(new QuantizeError({ reason: reply.error.code, message: reply.error.message }))
      })
    )
}
