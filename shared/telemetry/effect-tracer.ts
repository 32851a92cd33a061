/**
 * Implements: the Effect → OpenTelemetry tracer bridge (Effect 4.1 ships none): every Effect
 * span (`Effect.fn("X.y")`, `Effect.withSpan`) becomes an OTel span with the right parent,
 * local, bridged or remote (from message headers). `Telemetry.layer` (otel.ts) installs it
 * when traces are exported.
 *
 * Semantics: inside Effect code, Effect's current span is the truth. While a fiber runs, the
 * OTel active context is its current Effect span (or the empty root context when it has
 * none), so plain OTel API calls (`trace.getActiveSpan()`, `injectTraceHeaders()`) see it and
 * a scheduler batch never leaks one fiber's span into another. To hang Effect spans under a
 * span made with the plain OTel API, say so with `withOtelParent`.
 */
import * as api from "@opentelemetry/api"
import * as Cause from "effect/Cause"
import * as Context from "effect/Context"
import * as Effect from "effect/Effect"
import type * as Exit from "effect/Exit"
import type { Fiber } from "effect/Fiber"
import * as Option from "effect/Option"
import * as Tracer from "effect/Tracer"

/** W3C tracestate of a remote parent, carried in an Effect ExternalSpan's annotations. */
export class OtelTraceState extends Context.Service<OtelTraceState, api.TraceState>()(
  "flotilla/shared/telemetry/OtelTraceState"
) {}

/** An Effect parent span for an OTel span context (remote when it came off the wire). */
export const externalSpanFromContext = (sc: api.SpanContext): Tracer.ExternalSpan =>
  Tracer.externalSpan({
    traceId: sc.traceId,
    spanId: sc.spanId,
    sampled: (sc.traceFlags & api.TraceFlags.SAMPLED) === api.TraceFlags.SAMPLED,
    annotations: sc.traceState === undefined ? undefined : Context.make(OtelTraceState, sc.traceState)
  })

const kinds: Record<Tracer.SpanKind, api.SpanKind> = {
  internal: api.SpanKind.INTERNAL,
  server: api.SpanKind.SERVER,
  client: api.SpanKind.CLIENT,
  producer: api.SpanKind.PRODUCER,
  consumer: api.SpanKind.CONSUMER
}

const hrTime = (nanos: bigint): api.HrTime => [Number(nanos / 1_000_000_000n), Number(nanos % 1_000_000_000n)]

/** Effect attributes are `unknown`; OTel takes primitives and homogeneous arrays of them. */
export const toAttributeValue = (v: unknown): api.AttributeValue | undefined => {
  switch (typeof v) {
    case "string":
    case "number":
    case "boolean":
      return v
    case "bigint":
      return v.toString()
    case "undefined":
    case "function":
    case "symbol":
      return undefined
  }
  if (v === null) return undefined
  if (Array.isArray(v) && v.every((x) => typeof x === "number")) return v as Array<number>
  if (Array.isArray(v) && v.every((x) => typeof x === "string")) return v as Array<string>
  if (Array.isArray(v) && v.every((x) => typeof x === "boolean")) return v as Array<boolean>
  if (v instanceof Error) return `${v.name}: ${v.message}`
  try {
    return JSON.stringify(v, (_k, x) => (typeof x === "bigint" ? x.toString() : x))
  } catch {
    return String(v)
  }
}

const toAttributes = (r: Readonly<Record<string, unknown>>): api.Attributes => {
  const out: api.Attributes = {}
  for (const k in r) {
    const v = toAttributeValue(r[k])
    if (v !== undefined) out[k] = v
  }
  return out
}

/** The OTel span context of any Effect span (bridged, external, or native). */
export const spanContextOf = (span: Tracer.AnySpan): api.SpanContext => {
  if (span instanceof BridgeSpan) return span.otel.spanContext()
  return {
    traceId: span.traceId,
    spanId: span.spanId,
    traceFlags: span.sampled ? api.TraceFlags.SAMPLED : api.TraceFlags.NONE,
    isRemote: span._tag === "ExternalSpan",
    traceState: Context.getOrUndefined(span.annotations, OtelTraceState)
  }
}

const foreignContexts = new WeakMap<Tracer.AnySpan, api.Context>()

/** The OTel context in which `span` is the active span. */
const otelContextOf = (span: Tracer.AnySpan): api.Context => {
  if (span instanceof BridgeSpan) return span.context
  let ctx = foreignContexts.get(span)
  if (ctx === undefined) {
    ctx = api.trace.setSpanContext(api.ROOT_CONTEXT, spanContextOf(span))
    foreignContexts.set(span, ctx)
  }
  return ctx
}

type SpanInit = Parameters<Tracer.Tracer["span"]>[0]

/** An Effect span whose lifecycle drives a real OTel span. */
class BridgeSpan implements Tracer.Span {
  readonly _tag = "Span"
  readonly name: string
  readonly spanId: string
  readonly traceId: string
  readonly parent: Option.Option<Tracer.AnySpan>
  readonly annotations: Context.Context<never>
  readonly attributes = new Map<string, unknown>()
  readonly links: Array<Tracer.SpanLink>
  readonly sampled: boolean
  readonly kind: Tracer.SpanKind
  readonly otel: api.Span
  /** OTel context with this span active (what the fiber runs in while it is current). */
  readonly context: api.Context
  status: Tracer.SpanStatus

  constructor(tracer: api.Tracer, o: SpanInit) {
    this.name = o.name
    this.parent = o.root ? Option.none() : o.parent
    this.annotations = o.annotations
    this.links = o.links.slice()
    this.kind = o.kind
    const parentContext = Option.isSome(this.parent) ? otelContextOf(this.parent.value) : api.ROOT_CONTEXT
    this.otel = tracer.startSpan(
      o.name,
      {
        kind: kinds[o.kind],
        startTime: hrTime(o.startTime),
        links: this.links.map((l) => ({ context: spanContextOf(l.span), attributes: toAttributes(l.attributes) }))
      },
      parentContext
    )
    this.context = api.trace.setSpan(parentContext, this.otel)
    const sc = this.otel.spanContext()
    this.spanId = sc.spanId
    this.traceId = sc.traceId
    this.sampled = (sc.traceFlags & api.TraceFlags.SAMPLED) === api.TraceFlags.SAMPLED
    this.status = { _tag: "Started", startTime: o.startTime }
  }

  end(endTime: bigint, exit: Exit.Exit<unknown, unknown>): void {
    if (this.status._tag === "Ended") return
    this.status = { _tag: "Ended", startTime: this.status.startTime, endTime, exit }
    if (exit._tag === "Failure") {
      if (Cause.hasInterruptsOnly(exit.cause)) {
        this.otel.setAttribute("effect.interrupted", true)
      } else {
        const error = Cause.squash(exit.cause)
        const message = error instanceof Error ? error.message : toAttributeValue(error)?.toString() ?? "failure"
        this.otel.recordException(
          error instanceof Error ? error : { name: "EffectFailure", message },
          hrTime(endTime)
        )
        this.otel.setStatus({ code: api.SpanStatusCode.ERROR, message })
      }
    } else {
      this.otel.setStatus({ code: api.SpanStatusCode.OK })
    }
    this.otel.end(hrTime(endTime))
  }

  attribute(key: string, value: unknown): void {
    if (this.status._tag === "Ended") return
    this.attributes.set(key, value)
    const v = toAttributeValue(value)
    if (v !== undefined) this.otel.setAttribute(key, v)
  }

  event(name: string, startTime: bigint, attributes?: Record<string, unknown>): void {
    if (this.status._tag === "Ended") return
    this.otel.addEvent(name, attributes === undefined ? undefined : toAttributes(attributes), hrTime(startTime))
  }

  addLinks(links: ReadonlyArray<Tracer.SpanLink>): void {
    if (this.status._tag === "Ended") return
    this.links.push(...links)
    this.otel.addLinks(links.map((l) => ({ context: spanContextOf(l.span), attributes: toAttributes(l.attributes) })))
  }
}

const EVALUATE = "~effect/Effect/evaluate"
const evaluatePrimitive = <X>(p: Tracer.EffectPrimitive<X>, fiber: Fiber<any, any>): X => p[EVALUATE](fiber)

/**
 * An Effect Tracer that creates OTel spans through the global TracerProvider (so through the
 * SDK started by `startTelemetry`), and runs each fiber step with its span as the active OTel
 * context.
 */
export const makeOtelTracer = (tracer: api.Tracer = api.trace.getTracer("flotilla")): Tracer.Tracer =>
  Tracer.make({
    span: (options) => new BridgeSpan(tracer, options),
    context: <X>(primitive: Tracer.EffectPrimitive<X>, fiber: Fiber<any, any>): X => {
      const span = fiber.cache.span
      return api.context.with<[Tracer.EffectPrimitive<X>, Fiber<any, any>], (p: Tracer.EffectPrimitive<X>, f: Fiber<any, any>) => X>(
        span === undefined ? api.ROOT_CONTEXT : otelContextOf(span),
        evaluatePrimitive,
        undefined,
        primitive,
        fiber
      )
    }
  })

/**
 * Runs `effect` with an OTel span (or span context, or context holding one; by default the
 * OTel active span where this is called) as the parent of its Effect spans. Use it where plain
 * OTel code hands over to Effect code.
 */
export const withOtelParent = <A, E, R>(
  effect: Effect.Effect<A, E, R>,
  parent: api.Span | api.SpanContext | api.Context = api.context.active()
): Effect.Effect<A, E, R> => {
  const sc = "spanContext" in parent && typeof parent.spanContext === "function"
    ? parent.spanContext()
    : "traceId" in parent
    ? parent as api.SpanContext
    : api.trace.getSpanContext(parent as api.Context)
  return sc === undefined || !api.isSpanContextValid(sc)
    ? effect
    : Effect.withParentSpan(effect, externalSpanFromContext(sc)) as Effect.Effect<A, E, R>
}

