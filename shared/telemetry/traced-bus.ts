/**
 * Implements: tracing for every message, as a decorator of the `Bus` service.
 *
 * `TracedBus.layer` wraps whatever Bus is below it (NATS or in-process): publish and
 * request add `traceparent`/`tracestate` for the current Effect span, and every
 * subscription handler runs in a span (`recv <subject>`) whose parent is the sender's
 * span from the headers. So the actors need no tracing code of their own beyond naming
 * their work (`Effect.withSpan` / `Effect.fn`), and one training step is one trace:
 * worker step → lease (loader) → each gradient chunk (parameter server) → aggregate and
 * apply → LR request (scheduler) → version broadcast (workers).
 * With tracing off (no OTLP endpoint), every call passes straight through.
 */
import { Effect, Layer } from "effect"
import { Bus, type BusShape } from "../bus/Bus.ts"
import { resolveTelemetryConfig, tracingEnabled } from "./otel.ts"
import { traceHeaders, withRemoteParent } from "./propagation.ts"

export const traceBus = (inner: BusShape): BusShape => ({
  kind: inner.kind,
  get maxPayload() {
    return inner.maxPayload
  },
  publish: (subject, data, opts) =>
    tracingEnabled()
      ? Effect.flatMap(traceHeaders(opts?.headers), (headers) => inner.publish(subject, data, { ...opts, headers }))
      : inner.publish(subject, data, opts),
  request: (subject, data, opts) =>
    tracingEnabled()
      ? Effect.flatMap(traceHeaders(opts?.headers), (headers) => inner.request(subject, data, { ...opts, headers })).pipe(
          Effect.withSpan(`request ${subject}`, { kind: "client" })
        )
      : inner.request(subject, data, opts),
  respond: (to, data, headers) =>
    tracingEnabled() ? Effect.flatMap(traceHeaders(headers), (h) => inner.respond(to, data, h)) : inner.respond(to, data, headers),
  subscribe: (subject, handler, opts) =>
    inner.subscribe(
      subject,
      (m) => withRemoteParent(m.headers, handler(m), `recv ${subject}`, { "messaging.destination": m.subject, "messaging.message.body.size": m.data.byteLength }),
      opts
    ),
  flush: () => inner.flush()
})

export const TracedBus = {
  /**
   * A Bus that traces, over the Bus `inner` provides. When this process's environment
   * turns tracing off (no OTLP traces endpoint), it is `inner` itself: off costs nothing.
   */
  layer: <E, R>(inner: Layer.Layer<Bus, E, R>): Layer.Layer<Bus, E, R> =>
    resolveTelemetryConfig({ role: "bus", instanceId: "bus", job: "bus" }).tracing
      ? Layer.effect(Bus, Effect.map(Effect.service(Bus), traceBus)).pipe(Layer.provide(inner))
      : inner
}
