/**
 * Implements: a local OTLP/HTTP receiver for tests. An http server on a free port that accepts
 * POST /v1/traces in JSON (`OTEL_EXPORTER_OTLP_PROTOCOL=http/json`) and protobuf (the default
 * `http/protobuf`, decoded by a small hand-written reader of the OTLP trace messages), gzip
 * or not, and collects the spans; POST /v1/metrics is accepted too (JSON: metric names kept).
 * Does not own: anything about how spans are produced (shared/telemetry).
 *
 *   const rx = await startOtlpReceiver()
 *   // OTEL_EXPORTER_OTLP_ENDPOINT=rx.url
 *   await rx.waitFor((spans) => spans.some((s) => s.name === "X.y"))
 *   await rx.close()
 */
import * as http from "node:http"
import type { AddressInfo } from "node:net"
import * as zlib from "node:zlib"
import { afterAll, beforeAll } from "vitest"

export interface ReceivedSpan {
  readonly traceId: string
  readonly spanId: string
  /** Undefined for a root span. */
  readonly parentSpanId: string | undefined
  readonly name: string
  readonly kind: number
  readonly serviceName: string | undefined
  readonly instanceId: string | undefined
  readonly attributes: Readonly<Record<string, unknown>>
  readonly resource: Readonly<Record<string, unknown>>
  /** Status code: 0 unset, 1 ok, 2 error. */
  readonly statusCode: number
  /** "json" or "protobuf": how it arrived. */
  readonly encoding: "json" | "protobuf"
}

export interface OtlpReceiver {
  /** Base endpoint for OTEL_EXPORTER_OTLP_ENDPOINT, e.g. `http://127.0.0.1:43121`. */
  readonly url: string
  readonly spans: ReadonlyArray<ReceivedSpan>
  /** Names of metrics received in JSON export requests. */
  readonly metricNames: ReadonlySet<string>
  /** Request count per path (`/v1/traces`, `/v1/metrics`, ...). */
  readonly requests: Readonly<Record<string, number>>
  /** Resolves with all spans once `predicate` holds; rejects after `timeoutMs` listing what came. */
  waitFor(
    predicate: (spans: ReadonlyArray<ReceivedSpan>) => boolean,
    timeoutMs?: number
  ): Promise<ReadonlyArray<ReceivedSpan>>
  close(): Promise<void>
}

// ---------------------------------------------------------------------------------------------
// OTLP JSON (hex ids, AnyValue objects)
// ---------------------------------------------------------------------------------------------

type Json = any

const jsonValue = (v: Json): unknown => {
  if (v === undefined || v === null) return undefined
  if ("stringValue" in v) return v.stringValue
  if ("boolValue" in v) return v.boolValue
  if ("intValue" in v) return Number(v.intValue)
  if ("doubleValue" in v) return Number(v.doubleValue)
  if ("arrayValue" in v) return (v.arrayValue.values ?? []).map(jsonValue)
  if ("kvlistValue" in v) return jsonAttributes(v.kvlistValue.values)
  if ("bytesValue" in v) return v.bytesValue
  return undefined
}

const jsonAttributes = (kvs: Json): Record<string, unknown> => {
  const out: Record<string, unknown> = {}
  for (const kv of kvs ?? []) out[kv.key] = jsonValue(kv.value)
  return out
}

const spansFromJson = (body: Json): Array<ReceivedSpan> => {
  const out: Array<ReceivedSpan> = []
  for (const rs of body.resourceSpans ?? []) {
    const resource = jsonAttributes(rs.resource?.attributes)
    for (const ss of rs.scopeSpans ?? []) {
      for (const s of ss.spans ?? []) {
        out.push(makeSpan(resource, {
          traceId: s.traceId,
          spanId: s.spanId,
          parentSpanId: s.parentSpanId,
          name: s.name,
          kind: s.kind ?? 0,
          attributes: jsonAttributes(s.attributes),
          statusCode: s.status?.code ?? 0
        }, "json"))
      }
    }
  }
  return out
}

const metricNamesFromJson = (body: Json): Array<string> =>
  (body.resourceMetrics ?? []).flatMap((rm: Json) =>
    (rm.scopeMetrics ?? []).flatMap((sm: Json) => (sm.metrics ?? []).map((m: Json) => String(m.name)))
  )

const makeSpan = (
  resource: Record<string, unknown>,
  s: {
    traceId: string
    spanId: string
    parentSpanId: string | undefined
    name: string
    kind: number
    attributes: Record<string, unknown>
    statusCode: number
  },
  encoding: "json" | "protobuf"
): ReceivedSpan => ({
  ...s,
  parentSpanId: s.parentSpanId === undefined || s.parentSpanId === "" ? undefined : s.parentSpanId,
  serviceName: resource["service.name"] as string | undefined,
  instanceId: resource["service.instance.id"] as string | undefined,
  resource,
  encoding
})

// ---------------------------------------------------------------------------------------------
// OTLP protobuf: just enough of the wire format for ExportTraceServiceRequest
// ---------------------------------------------------------------------------------------------

interface Field {
  readonly no: number
  readonly wire: number
  /** varint (as bigint), fixed64/fixed32 bytes, or length-delimited bytes. */
  readonly value: bigint | Uint8Array
}

const readFields = (buf: Uint8Array): Array<Field> => {
  const fields: Array<Field> = []
  let i = 0
  const varint = (): bigint => {
    let result = 0n
    let shift = 0n
    for (;;) {
      if (i >= buf.length) throw new Error("truncated varint")
      const b = buf[i++]!
      result |= BigInt(b & 0x7f) << shift
      if ((b & 0x80) === 0) return result
      shift += 7n
    }
  }
  while (i < buf.length) {
    const key = Number(varint())
    const no = key >>> 3
    const wire = key & 7
    if (wire === 0) fields.push({ no, wire, value: varint() })
    else if (wire === 1) fields.push({ no, wire, value: buf.subarray(i, (i += 8)) })
    else if (wire === 5) fields.push({ no, wire, value: buf.subarray(i, (i += 4)) })
    else if (wire === 2) {
      const len = Number(varint())
      fields.push({ no, wire, value: buf.subarray(i, (i += len)) })
    } else throw new Error(`unsupported protobuf wire type ${wire}`)
  }
  return fields
}

const bytesOf = (fs: Array<Field>, no: number): Array<Uint8Array> =>
  fs.filter((f) => f.no === no && f.wire === 2).map((f) => f.value as Uint8Array)
const first = (fs: Array<Field>, no: number): Field | undefined => fs.find((f) => f.no === no)
const str = (b: Uint8Array | undefined): string => (b === undefined ? "" : Buffer.from(b).toString("utf8"))
const hex = (b: Uint8Array | undefined): string => (b === undefined ? "" : Buffer.from(b).toString("hex"))

// AnyValue: 1 string, 2 bool, 3 int64, 4 double, 5 ArrayValue{1: values}, 6 KeyValueList{1: values}, 7 bytes
const pbValue = (buf: Uint8Array): unknown => {
  const f = readFields(buf)[0]
  if (f === undefined) return undefined
  switch (f.no) {
    case 1:
      return str(f.value as Uint8Array)
    case 2:
      return (f.value as bigint) !== 0n
    case 3:
      return Number(BigInt.asIntN(64, f.value as bigint))
    case 4:
      return Buffer.from(f.value as Uint8Array).readDoubleLE(0)
    case 5:
      return bytesOf(readFields(f.value as Uint8Array), 1).map(pbValue)
    case 6:
      return pbAttributes(bytesOf(readFields(f.value as Uint8Array), 1))
    case 7:
      return hex(f.value as Uint8Array)
  }
  return undefined
}

// KeyValue: 1 key, 2 value
const pbAttributes = (kvs: Array<Uint8Array>): Record<string, unknown> => {
  const out: Record<string, unknown> = {}
  for (const kv of kvs) {
    const f = readFields(kv)
    const v = first(f, 2)
    out[str(first(f, 1)?.value as Uint8Array | undefined)] = v === undefined ? undefined : pbValue(v.value as Uint8Array)
  }
  return out
}

// ExportTraceServiceRequest{1: ResourceSpans}; ResourceSpans{1: Resource{1: attrs}, 2: ScopeSpans};
// ScopeSpans{2: Span}; Span{1 trace_id, 2 span_id, 4 parent_span_id, 5 name, 6 kind, 9 attrs, 15 status{3: code}}
const spansFromProtobuf = (buf: Uint8Array): Array<ReceivedSpan> => {
  const out: Array<ReceivedSpan> = []
  for (const rsBuf of bytesOf(readFields(buf), 1)) {
    const rs = readFields(rsBuf)
    const resBuf = bytesOf(rs, 1)[0]
    const resource = resBuf === undefined ? {} : pbAttributes(bytesOf(readFields(resBuf), 1))
    for (const ssBuf of bytesOf(rs, 2)) {
      for (const spanBuf of bytesOf(readFields(ssBuf), 2)) {
        const s = readFields(spanBuf)
        const statusBuf = bytesOf(s, 15)[0]
        const code = statusBuf === undefined ? undefined : first(readFields(statusBuf), 3)?.value
        out.push(makeSpan(resource, {
          traceId: hex(bytesOf(s, 1)[0]),
          spanId: hex(bytesOf(s, 2)[0]),
          parentSpanId: hex(bytesOf(s, 4)[0]),
          name: str(bytesOf(s, 5)[0]),
          kind: Number((first(s, 6)?.value as bigint | undefined) ?? 0n),
          attributes: pbAttributes(bytesOf(s, 9)),
          statusCode: Number((code as bigint | undefined) ?? 0n)
        }, "protobuf"))
      }
    }
  }
  return out
}

// ---------------------------------------------------------------------------------------------
// The server
// ---------------------------------------------------------------------------------------------

const readBody = (req: http.IncomingMessage): Promise<Buffer> =>
  new Promise((resolve, reject) => {
    const chunks: Array<Buffer> = []
    req.on("data", (c: Buffer) => chunks.push(c))
    req.on("error", reject)
    req.on("end", () => {
      const raw = Buffer.concat(chunks)
      resolve(req.headers["content-encoding"] === "gzip" ? zlib.gunzipSync(raw) : raw)
    })
  })

export const startOtlpReceiver = async (): Promise<OtlpReceiver> => {
  const spans: Array<ReceivedSpan> = []
  const metricNames = new Set<string>()
  const requests: Record<string, number> = {}
  const listeners = new Set<() => void>()

  const server = http.createServer((req, res) => {
    const path = (req.url ?? "/").split("?")[0]!
    requests[path] = (requests[path] ?? 0) + 1
    readBody(req).then((body) => {
      const json = (req.headers["content-type"] ?? "").includes("json")
      if (req.method === "POST" && path === "/v1/traces") {
        spans.push(...(json ? spansFromJson(JSON.parse(body.toString("utf8"))) : spansFromProtobuf(body)))
      } else if (req.method === "POST" && path === "/v1/metrics") {
        if (json) for (const n of metricNamesFromJson(JSON.parse(body.toString("utf8")))) metricNames.add(n)
      } else if (req.method === "POST" && path === "/v1/logs") {
        // accepted, ignored
      } else {
        res.writeHead(404).end()
        return
      }
      for (const l of listeners) l()
      if (json) res.writeHead(200, { "content-type": "application/json" }).end("{}")
      else res.writeHead(200, { "content-type": "application/x-protobuf" }).end()
    }).catch((e: unknown) => {
      res.writeHead(400, { "content-type": "text/plain" }).end(String(e))
    })
  })
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve))
  const { port } = server.address() as AddressInfo

  return {
    url: `http://127.0.0.1:${port}`,
    spans,
    metricNames,
    requests,
    waitFor: (predicate, timeoutMs = 15_000) =>
      new Promise((resolve, reject) => {
        const check = (): boolean => {
          if (!predicate(spans)) return false
          listeners.delete(check)
          clearTimeout(timer)
          resolve(spans)
          return true
        }
        const timer = setTimeout(() => {
          listeners.delete(check)
          const seen = spans.map((s) => `${s.serviceName}/${s.name}`).join(", ")
          reject(new Error(`OTLP receiver: condition not met after ${timeoutMs} ms; spans seen: [${seen}]`))
        }, timeoutMs)
        listeners.add(check)
        check()
      }),
    close: () =>
      new Promise<void>((resolve) => {
        server.closeAllConnections()
        server.close(() => resolve())
      })
  }
}

/** A receiver for a test file: started before its tests, closed after. */
export const useOtlpReceiver = (): { readonly current: () => OtlpReceiver } => {
  let rx: OtlpReceiver | undefined
  beforeAll(async () => {
    rx = await startOtlpReceiver()
  })
  afterAll(async () => {
    await rx?.close()
  })
  return { current: () => rx! }
}
