/**
 * Implements: W3C trace context (`traceparent`, `tracestate`) in NATS message headers, so one
 * training step is one trace across processes: a publisher adds the headers with
 * `injectTraceHeaders` (plain code) or `traceHeaders` (Effect code), and a subscriber runs its
 * handler under the remote parent with `withRemoteParent`.
 * Does not own: starting the SDK or the Effect tracer bridge (otel.ts), the bus (shared/bus).
 *
 * Everything here is a cheap no-op while this process exports no traces (`tracingEnabled()`):
 * headers come back unchanged and effects run without a span.
 * Format: https://www.w3.org/TR/trace-context/ — `00-<32 hex trace id>-<16 hex span id>-<2 hex flags>`.
 */
import * as api from "@opentelemetry/api"
import * as Effect from "effect/Effect"
import * as Option from "effect/Option"
import * as Tracer from "effect/Tracer"
import { externalSpanFromContext, spanContextOf } from "./effect-tracer.ts"
import { tracingEnabled } from "./otel.ts"
import { HEADERS } from "../protocol/headers.ts"

/** NATS headers as this project passes them around. */
export type Headers = Readonly<Record<string, string>>

export const TRACEPARENT = HEADERS.traceparent
export const TRACESTATE = HEADERS.tracestate

const TRACEPARENT_RE = /^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?$/

/** `traceparent` for a span context (always version 00). */
export const formatTraceparent = (sc: api.SpanContext): string =>
  `00-${sc.traceId}-${sc.spanId}-${(sc.traceFlags & 0xff).toString(16).padStart(2, "0")}`

/** The remote span context in a `traceparent` (+ `tracestate`), or undefined if absent/invalid. */
export const parseTraceparent = (traceparent: string | undefined, tracestate?: string): api.SpanContext | undefined => {
  if (traceparent === undefined) return undefined
  const m = TRACEPARENT_RE.exec(traceparent.trim().toLowerCase())
  if (m === null) return undefined
  const [, version, traceId, spanId, flags, rest] = m
  // Version ff is invalid; version 00 has exactly four fields.
  if (version === "ff" || (version === "00" && rest !== undefined)) return undefined
  const sc: api.SpanContext = {
    traceId: traceId!,
    spanId: spanId!,
    traceFlags: parseInt(flags!, 16) & api.TraceFlags.SAMPLED,
    isRemote: true,
    traceState: tracestate !== undefined && tracestate.trim() !== "" ? api.createTraceState(tracestate) : undefined
  }
  return api.isSpanContextValid(sc) ? sc : undefined
}

/** Header lookup that tolerates the case NATS servers or other clients may use. */
const header = (headers: Headers, name: string): string | undefined => {
  const v = headers[name]
  if (v !== undefined) return v
  for (const k in headers) if (k.toLowerCase() === name) return headers[k]
  return undefined
}

/** The span context carried by these headers, if any (pure; works with telemetry off). */
export const extractSpanContext = (headers: Headers | undefined): api.SpanContext | undefined =>
  headers === undefined ? undefined : parseTraceparent(header(headers, TRACEPARENT), header(headers, TRACESTATE))

/**
 * An OTel context whose active span is the remote parent in the headers (on top of `base`, the
 * active context by default); `base` itself when the headers carry none.
 */
export const extractTraceContext = (
  headers: Headers | undefined,
  base: api.Context = api.context.active()
): api.Context => {
  const sc = extractSpanContext(headers)
  return sc === undefined ? base : api.trace.setSpanContext(base, sc)
}

/** What a trace can be injected from. */
export type TraceSource = api.Span | api.SpanContext | api.Context | Tracer.AnySpan

const spanContextFrom = (from: TraceSource | undefined): api.SpanContext | undefined => {
  if (from === undefined) return api.trace.getSpanContext(api.context.active())
  if ("_tag" in from && (from._tag === "Span" || from._tag === "ExternalSpan")) {
    return spanContextOf(from as Tracer.AnySpan)
  }
  if ("spanContext" in from && typeof from.spanContext === "function") return from.spanContext()
  if ("traceId" in from && "spanId" in from && "traceFlags" in from) return from as api.SpanContext
  return api.trace.getSpanContext(from as api.Context)
}

/**
 * `headers` plus `traceparent`/`tracestate` for `from` (an OTel span, span context or context,
 * or an Effect span; by default the active OTel context, which inside Effect code is the
 * fiber's current span). Returns `headers` as given when tracing is off or there is no span.
 */
export const injectTraceHeaders = (headers: Headers = {}, from?: TraceSource): Headers => {
  if (!tracingEnabled()) return headers
  const sc = spanContextFrom(from)
  if (sc === undefined || !api.isSpanContextValid(sc)) return headers
  const out: Record<string, string> = { ...headers, [TRACEPARENT]: formatTraceparent(sc) }
  const state = sc.traceState?.serialize()
  if (state !== undefined && state !== "") out[TRACESTATE] = state
  else delete out[TRACESTATE]
  return out
}

/** Effect version of `injectTraceHeaders`: the trace of the current Effect span, if any. */
export const traceHeaders = (headers: Headers = {}): Effect.Effect<Headers> =>
  Effect.suspend(() =>
    tracingEnabled()
      ? Effect.map(Effect.serviceOption(Tracer.ParentSpan), (span) =>
        Option.isSome(span) ? injectTraceHeaders(headers, span.value) : headers)
      : Effect.succeed(headers)
  )

export interface RemoteSpanOptions {
  /** Defaults to "consumer": the span handles a message. */
  readonly kind?: Tracer.SpanKind | undefined
}

/**
 * Runs `effect` in a span named `spanName` whose parent is the remote span in `headers` (what a
 * subscriber does on receipt). Without trace headers the span hangs under the current Effect
 * span; with tracing off `effect` runs as is.
 */
export const withRemoteParent = <A, E, R>(
  headers: Headers | undefined,
  effect: Effect.Effect<A, E, R>,
  spanName: string,
  attributes?: Readonly<Record<string, unknown>>,
  options?: RemoteSpanOptions
): Effect.Effect<A, E, Exclude<R, Tracer.ParentSpan>> =>
  // Decided when it runs, not when it is built: the telemetry layer may start in between.
  Effect.suspend(() => {
    if (!tracingEnabled()) return effect as Effect.Effect<A, E, Exclude<R, Tracer.ParentSpan>>
    const sc = extractSpanContext(headers)
    return Effect.withSpan(effect, spanName, {
      attributes: attributes as Record<string, unknown> | undefined,
      kind: options?.kind ?? "consumer",
      parent: sc === undefined ? undefined : externalSpanFromContext(sc)
    })
  })
