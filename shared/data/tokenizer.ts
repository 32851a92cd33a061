/**
 * Implements: a word-level tokenizer for classifiers (Keras `Tokenizer(num_words=N)` +
 * `pad_sequences(padding="post", truncating="post")`).
 *
 * Ids: 0 is PAD, 1 is UNK (out-of-vocabulary), the i-th vocabulary word is i + 2. The
 * vocabulary is the vocabSize - 2 most frequent words of the fitting texts, ties broken
 * by the word (code-unit order), so fitting is deterministic. A text encodes to exactly
 * maxLen ids: its FIRST maxLen words, then PAD. Serialises to/from plain JSON.
 * Does not own: loading corpora (shared/data/labelled.ts) or the byte-level LM tokens
 * (shared/data/corpus.ts).
 */

export const PAD = 0
export const UNK = 1

export interface WordTokenizer {
  readonly kind: "words"
  readonly vocabSize: number // ids 0 .. vocabSize-1
  readonly maxLen: number // ids per encoded text
  readonly words: readonly string[] // id of words[i] is i + 2; words.length <= vocabSize - 2
}

/**
 * A word: a maximal run of Unicode letters/digits, combining marks allowed after its first
 * character (so decomposed accents and Indic vowel signs do not split words), with single
 * apostrophes (' or ’, written ') inside it kept ("don't"). Everything else separates.
 */
const WORD = /[\p{L}\p{N}][\p{L}\p{N}\p{M}]*(?:'[\p{L}\p{N}\p{M}]+)*/gu

// Lowercase the whole text before matching (fit, encode and splitWords all do the same, so
// they agree on every word): "İ" lowercases to "i" + a combining mark, kept inside the word.
const lowered = (text: string): string => {
  const l = text.toLowerCase()
  return l.includes("’") ? l.replaceAll("’", "'") : l
}

/** Lowercased words of a text, in order. */
export const splitWords = (text: string): string[] => lowered(text).match(WORD) ?? []

const checkSizes = (vocabSize: unknown, maxLen: unknown): void => {
  if (!Number.isInteger(vocabSize) || (vocabSize as number) < 3) {
    throw new RangeError(`tokenizer vocabSize ${String(vocabSize)} must be an integer >= 3 (PAD, UNK and a word)`)
  }
  if (!Number.isInteger(maxLen) || (maxLen as number) < 1) {
    throw new RangeError(`tokenizer maxLen ${String(maxLen)} must be an integer >= 1`)
  }
}

/** The vocabSize - 2 most frequent words of `texts`; ties broken by the word (code-unit order). */
export const fitTokenizer = (texts: Iterable<string>, vocabSize: number, maxLen: number): WordTokenizer => {
  checkSizes(vocabSize, maxLen)
  const counts = new Map<string, number>()
  // measured on spam-assassin (6046 emails, 32 MB, 3.2 M words): ~0.8 s, most of it the Map
  for (const text of texts) {
    for (const w of splitWords(text)) counts.set(w, (counts.get(w) ?? 0) + 1)
  }
  const words = [...counts.entries()]
    .sort((a, b) => b[1] - a[1] || (a[0] < b[0] ? -1 : a[0] > b[0] ? 1 : 0))
    .slice(0, vocabSize - 2)
    .map(([w]) => w)
  return { kind: "words", vocabSize, maxLen, words }
}

// word → id, built once per tokenizer object (tokenizers are immutable)
const idMaps = new WeakMap<WordTokenizer, Map<string, number>>()
const idMap = (t: WordTokenizer): Map<string, number> => {
  let m = idMaps.get(t)
  if (!m) {
    m = new Map(t.words.map((w, i) => [w, i + 2]))
    idMaps.set(t, m)
  }
  return m
}

/** Encode into `out` at `offset`: maxLen ids, the first maxLen words then PAD (out is zeroed = PAD). */
const encodeInto = (ids: Map<string, number>, maxLen: number, text: string, out: Int32Array, offset: number): void => {
  const re = new RegExp(WORD) // own lastIndex
  const s = lowered(text)
  for (let k = 0; k < maxLen; k++) {
    const m = re.exec(s)
    if (m === null) return
    out[offset + k] = ids.get(m[0]) ?? UNK
  } // stop scanning after maxLen words: the rest is truncated
}

/** [maxLen] word ids of a text: UNK for out-of-vocabulary words, truncated, PAD at the end. */
export const encode = (t: WordTokenizer, text: string): Int32Array => {
  const out = new Int32Array(t.maxLen)
  encodeInto(idMap(t), t.maxLen, text, out, 0)
  return out
}

/** [n, maxLen] row-major ids of n texts. */
export const encodeMany = (t: WordTokenizer, texts: readonly string[]): Int32Array => {
  const ids = idMap(t)
  const out = new Int32Array(texts.length * t.maxLen)
  texts.forEach((text, i) => encodeInto(ids, t.maxLen, text, out, i * t.maxLen))
  return out
}

/** Ids back to words joined by " ": UNK is "<unk>", PAD is dropped; another id is a RangeError. */
export const decode = (t: WordTokenizer, ids: ArrayLike<number>): string => {
  const out: string[] = []
  for (let i = 0; i < ids.length; i++) {
    const id = ids[i]
    if (id === PAD) continue
    if (id === UNK) out.push("<unk>")
    else if (Number.isInteger(id) && id >= 2 && id - 2 < t.words.length) out.push(t.words[id - 2])
    else throw new RangeError(`token id ${id} at ${i} is not in this tokenizer (ids 0..${t.words.length + 1})`)
  }
  return out.join(" ")
}

export const tokenizerToJson = (t: WordTokenizer): unknown => ({
  kind: t.kind,
  vocabSize: t.vocabSize,
  maxLen: t.maxLen,
  words: [...t.words]
})

/** Validate and rebuild a tokenizer from its JSON; an Error names the bad field. */
export const tokenizerFromJson = (x: unknown): WordTokenizer => {
  if (typeof x !== "object" || x === null || Array.isArray(x)) throw new Error("tokenizer JSON: not an object")
  const o = x as Record<string, unknown>
  if (o.kind !== "words") throw new Error(`tokenizer JSON: kind is ${JSON.stringify(o.kind)}, expected "words"`)
  try {
    checkSizes(o.vocabSize, o.maxLen)
  } catch (e) {
    throw new Error(`tokenizer JSON: ${(e as Error).message}`)
  }
  const vocabSize = o.vocabSize as number
  if (!Array.isArray(o.words)) throw new Error("tokenizer JSON: words is not an array")
  if (o.words.length > vocabSize - 2) {
    throw new Error(`tokenizer JSON: words has ${o.words.length} entries, more than vocabSize - 2 = ${vocabSize - 2}`)
  }
  const seen = new Set<string>()
  o.words.forEach((w, i) => {
    if (typeof w !== "string" || w === "") throw new Error(`tokenizer JSON: words[${i}] is not a non-empty string`)
    if (seen.has(w)) throw new Error(`tokenizer JSON: words[${i}] (${JSON.stringify(w)}) is a duplicate`)
    seen.add(w)
  })
  return { kind: "words", vocabSize, maxLen: o.maxLen as number, words: [...(o.words as string[])] }
}
