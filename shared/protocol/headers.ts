/**
 * Implements: every NATS header name Flotilla uses, defined once. The wire format
 * (shared/wire/frames.ts `H`, transport.ts `T`), lease replies (`Flotilla-Batch`) and trace
 * context (shared/telemetry/propagation.ts) take their names from here; docs/PROTOCOL.md
 * documents each. Keys are case-sensitive as written.
 */
export const HEADERS = {
  // framing of one message over many (shared/wire/frames.ts)
  wire: "Flotilla-Wire",
  id: "Flotilla-Id",
  chunk: "Flotilla-Chunk",
  chunks: "Flotilla-Chunks",
  offset: "Flotilla-Offset",
  chunkCrc: "Flotilla-Chunk-Crc",
  total: "Flotilla-Total",
  crc: "Flotilla-Crc",
  manifest: "Flotilla-Manifest",
  // how a bundle travels to a queue group or back to a requester (shared/wire/transport.ts)
  claim: "Flotilla-Claim",
  inbox: "Flotilla-Inbox",
  error: "Flotilla-Error",
  // a lease reply's batch metadata (BatchLeased JSON)
  batch: "Flotilla-Batch",
  // W3C trace context
  traceparent: "traceparent",
  tracestate: "tracestate"
} as const
