/**
 * Implements: decoding JSON messages at the edge, with errors that say why.
 *
 * Every JSON message that crosses the bus is decoded here against its Effect Schema.
 * A failure is a `ProtocolDecodeError` carrying a human-readable reason (which field,
 * what was expected); callers reply with it or publish it on the job's errors subject.
 * Inside an actor, decoded values are trusted.
 */
import { Data, Effect, Result, Schema, SchemaIssue } from "effect"

export class ProtocolDecodeError extends Data.TaggedError("ProtocolDecodeError")<{
  readonly subject: string
  readonly reason: string
}> {
  override get message() {
    return `bad message on ${this.subject}: ${this.reason}`
  }
}

const formatIssue = SchemaIssue.makeFormatterDefault()
const textDecoder = new TextDecoder("utf-8", { fatal: true })
const textEncoder = new TextEncoder()

/** Parse UTF-8 JSON; a reason string on failure. */
export const parseJson = (bytes: Uint8Array): Result.Result<unknown, string> => {
  if (bytes.byteLength === 0) return Result.fail("empty payload (expected a JSON object)")
  let text: string
  try {
    text = textDecoder.decode(bytes)
  } catch {
    return Result.fail("payload is not valid UTF-8")
  }
  try {
    return Result.succeed(JSON.parse(text))
  } catch (e) {
    return Result.fail(`payload is not JSON: ${(e as Error).message}`)
  }
}

/** Decode `input` (already parsed) against `schema`, synchronously. */
export const decodeValue = <S extends Schema.Top & { readonly DecodingServices: never }>(
  schema: S,
  subject: string,
  input: unknown
): Result.Result<S["Type"], ProtocolDecodeError> => {
  const r = Schema.decodeUnknownResult(schema)(input)
  return Result.isSuccess(r)
    ? Result.succeed(r.success)
    : Result.fail(new ProtocolDecodeError({ subject, reason: formatIssue(r.failure.issue).replace(/\n\s*/g, " ") }))
}

/** Decode UTF-8 JSON bytes against `schema`, synchronously. */
export const decodeBytes = <S extends Schema.Top & { readonly DecodingServices: never }>(
  schema: S,
  subject: string,
  bytes: Uint8Array
): Result.Result<S["Type"], ProtocolDecodeError> => {
  const json = parseJson(bytes)
  if (Result.isFailure(json)) return Result.fail(new ProtocolDecodeError({ subject, reason: json.failure }))
  return decodeValue(schema, subject, json.success)
}

/** Effect form of `decodeBytes`. */
export const decodeMessage = <S extends Schema.Top & { readonly DecodingServices: never }>(
  schema: S,
  subject: string,
  bytes: Uint8Array
): Effect.Effect<S["Type"], ProtocolDecodeError> => Effect.fromResult(decodeBytes(schema, subject, bytes))

/** Encode a message as UTF-8 JSON (messages are plain data: no class instances). */
export const encodeMessage = (message: unknown): Uint8Array => textEncoder.encode(JSON.stringify(message))
