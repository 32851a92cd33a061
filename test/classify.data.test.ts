/**
 * Tests the classification-data layer: the word tokenizer (shared/data/tokenizer.ts) and
 * the labelled-corpus loaders and stratified split (shared/data/labelled.ts), on temp
 * files made here and on the bundled SpamAssassin corpus. No actors, no tensors.
 */
import { mkdirSync, mkdtempSync, writeFileSync } from "node:fs"
import { tmpdir } from "node:os"
import { join } from "node:path"
import { describe, expect, it } from "vitest"
import { bundledLabelled, LabelledDataError, loadLabelled, splitRecord, stratifiedSplit } from "../shared/data/labelled.ts"
import {
  decode,
  encode,
  encodeMany,
  fitTokenizer,
  PAD,
  splitWords,
  tokenizerFromJson,
  tokenizerToJson,
  UNK
} from "../shared/data/tokenizer.ts"

const tmp = () => mkdtempSync(join(tmpdir(), "flotilla-classify-"))

/** A folder-per-class corpus: { class: { file: content } }. */
const makeFolder = (classes: Record<string, Record<string, string | Uint8Array>>): string => {
  const root = tmp()
  for (const [c, files] of Object.entries(classes)) {
    mkdirSync(join(root, c))
    for (const [f, body] of Object.entries(files)) writeFileSync(join(root, c, f), body)
  }
  return root
}

const writeTmp = (name: string, body: string | Uint8Array): string => {
  const p = join(tmp(), name)
  writeFileSync(p, body)
  return p
}

const expectBad = (spec: string, message: RegExp) => {
  let err: unknown
  try {
    loadLabelled(spec)
  } catch (e) {
    err = e
  }
  expect(err).toBeInstanceOf(LabelledDataError)
  expect((err as LabelledDataError)._tag).toBe("LabelledDataError")
  expect((err as Error).message).toMatch(message)
}

describe("splitWords", () => {
  it("lowercases, keeps inner apostrophes and splits on everything else", () => {
    expect(splitWords("Don't STOP—now! e-mail 3.14 'quoted' rock’n’roll naïve Ünïcödé 東京 ''a''")).toEqual([
      "don't",
      "stop",
      "now",
      "e",
      "mail",
      "3",
      "14",
      "quoted",
      "rock'n'roll",
      "naïve",
      "ünïcödé",
      "東京",
      "a"
    ])
    expect(splitWords("")).toEqual([])
    expect(splitWords(" \n\t--- ")).toEqual([])
  })
})

describe("word tokenizer", () => {
  const texts = ["the cat sat on the mat", "the dog sat", "a cat, a dog; THE END"]
  // counts: the 4, a 2, cat 2, dog 2, sat 2, end 1, mat 1, on 1

  it("fits the most frequent words, ties broken by code-unit order, deterministically", () => {
    const t = fitTokenizer(texts, 2 + 5, 8)
    expect(t).toEqual({ kind: "words", vocabSize: 7, maxLen: 8, words: ["the", "a", "cat", "dog", "sat"] })
    expect(fitTokenizer([...texts].reverse(), 7, 8)).toEqual(t)
    // equal counts: code-unit order of the (lowercased) words
    expect(fitTokenizer(["b a", "Z z y y x x"], 5, 4).words).toEqual(["x", "y", "z"])
    expect(fitTokenizer(["b a c"], 4, 4).words).toEqual(["a", "b"])
    // a big vocabulary holds every word once
    expect(fitTokenizer(texts, 100, 8).words).toHaveLength(8)
  })

  it("rejects bad sizes", () => {
    expect(() => fitTokenizer(texts, 2, 8)).toThrow(/vocabSize/)
    expect(() => fitTokenizer(texts, 10.5, 8)).toThrow(/vocabSize/)
    expect(() => fitTokenizer(texts, 10, 0)).toThrow(/maxLen/)
  })

  it("encodes ids (UNK out of vocab), truncates to the first maxLen words, pads at the end", () => {
    const t = fitTokenizer(texts, 7, 8)
    expect(Array.from(encode(t, "The cat ate"))).toEqual([2, 4, UNK, PAD, PAD, PAD, PAD, PAD])
    expect(Array.from(encode(t, ""))).toEqual(new Array(8).fill(PAD))
    const long = "sat dog cat a the zebra sat dog cat a the"
    expect(Array.from(encode(t, long))).toEqual([6, 5, 4, 3, 2, UNK, 6, 5])
    const many = encodeMany(t, ["the cat ate", long, ""])
    expect(many).toHaveLength(3 * 8)
    expect(Array.from(many.subarray(0, 8))).toEqual(Array.from(encode(t, "the cat ate")))
    expect(Array.from(many.subarray(8, 16))).toEqual(Array.from(encode(t, long)))
    expect(Array.from(many.subarray(16))).toEqual(new Array(8).fill(PAD))
  })

  it("round-trips text: decode(encode(x)) is splitWords(x), <unk> for out of vocab, truncated", () => {
    const corpus = [
      "Hello, World! Don't panic: the answer is 42.",
      "Spam spam SPAM, wonderful spam. Lovely spam!",
      "Ünïcödé words and 東京 too"
    ]
    const maxLen = 6
    const t = fitTokenizer(corpus, 12, maxLen)
    const vocab = new Set(t.words)
    for (const x of [...corpus, "an entirely new sentence with spam in it", ""]) {
      const want = splitWords(x)
        .slice(0, maxLen)
        .map((w) => (vocab.has(w) ? w : "<unk>"))
        .join(" ")
      expect(decode(t, encode(t, x))).toBe(want)
    }
    expect(() => decode(t, [t.vocabSize + 5])).toThrow(RangeError)
  })

  it("round-trips through JSON and validates it", () => {
    const t = fitTokenizer(texts, 7, 8)
    const back = tokenizerFromJson(JSON.parse(JSON.stringify(tokenizerToJson(t))))
    expect(back).toEqual(t)
    expect(Array.from(encode(back, "the dog ate"))).toEqual(Array.from(encode(t, "the dog ate")))
    const good = tokenizerToJson(t) as Record<string, unknown>
    expect(() => tokenizerFromJson(null)).toThrow(/object/)
    expect(() => tokenizerFromJson({ ...good, kind: "bytes" })).toThrow(/kind/)
    expect(() => tokenizerFromJson({ ...good, vocabSize: "7" })).toThrow(/vocabSize/)
    expect(() => tokenizerFromJson({ ...good, maxLen: 1.5 })).toThrow(/maxLen/)
    expect(() => tokenizerFromJson({ ...good, words: "the" })).toThrow(/words/)
    expect(() => tokenizerFromJson({ ...good, words: ["a", "a"] })).toThrow(/words\[1\].*duplicate/)
    expect(() => tokenizerFromJson({ ...good, words: ["a", ""] })).toThrow(/words\[1\]/)
    expect(() => tokenizerFromJson({ ...good, words: ["a", 3] })).toThrow(/words\[1\]/)
    expect(() => tokenizerFromJson({ ...good, words: ["a", "b", "c", "d", "e", "f"] })).toThrow(/words.*vocabSize/)
  })
})

describe("loadLabelled", () => {
  it("reads a folder per class: labels are the sorted folder names, texts by class then file name", () => {
    const root = makeFolder({
      spam: { "b.txt": "buy now", "a.txt": "cheap pills", "notes.md": "ignored", ".hidden.txt": "ignored" },
      ham: { "x.txt": "hello bob", "empty.txt": "" }
    })
    mkdirSync(join(root, ".git"))
    writeFileSync(join(root, "README"), "not a class")
    const c = loadLabelled(root)
    expect(c.name).toBe(root)
    expect(c.labels).toEqual(["ham", "spam"])
    expect(c.texts).toEqual(["", "hello bob", "cheap pills", "buy now"])
    expect(Array.from(c.y)).toEqual([0, 0, 1, 1])
    expect(c.sources).toEqual([
      join(root, "ham", "empty.txt"),
      join(root, "ham", "x.txt"),
      join(root, "spam", "a.txt"),
      join(root, "spam", "b.txt")
    ])
  })

  it("reads jsonl: labels are the sorted distinct labels, texts in file order, blank lines skipped", () => {
    const p = writeTmp(
      "d.jsonl",
      [
        JSON.stringify({ text: "great film", label: "pos" }),
        "",
        JSON.stringify({ text: "awful\nplot", label: "neg", id: 7 }),
        JSON.stringify({ text: "", label: "pos" }),
        ""
      ].join("\n")
    )
    const c = loadLabelled(p)
    expect(c.labels).toEqual(["neg", "pos"])
    expect(c.texts).toEqual(["great film", "awful\nplot", ""])
    expect(Array.from(c.y)).toEqual([1, 0, 1])
    expect(c.sources).toEqual([`${p}:1`, `${p}:3`, `${p}:4`])
    const nums = loadLabelled(writeTmp("n.jsonl", '{"text":"a","label":"1"}\n{"text":"b","label":"0"}\n'))
    expect(nums.labels).toEqual(["0", "1"])
    expect(Array.from(nums.y)).toEqual([1, 0])
  })

  it("reads RFC 4180 csv: quoted commas, quotes and newlines; extra columns; CRLF", () => {
    const p = writeTmp(
      "d.csv",
      'id,Label,text\r\n1,spam,"Buy now, cheap!"\r\n2,ham,"He said ""hi""\nthen left"\r\n3,ham,plain\r\n4,spam,\r\n'
    )
    const c = loadLabelled(p)
    expect(c.labels).toEqual(["ham", "spam"])
    expect(c.texts).toEqual(["Buy now, cheap!", 'He said "hi"\nthen left', "plain", ""])
    expect(Array.from(c.y)).toEqual([1, 0, 0, 1])
    // sources name the line each record starts on (record 2 spans lines 3-4)
    expect(c.sources).toEqual([`${p}:2`, `${p}:3`, `${p}:5`, `${p}:6`])
  })

  it("loads the bundled spam-assassin corpus: 4150 ham, 1896 spam, Subject + body only", () => {
    expect(bundledLabelled).toEqual(["spam-assassin"])
    const c = loadLabelled("spam-assassin")
    expect(c.name).toBe("spam-assassin")
    expect(c.labels).toEqual(["ham", "spam"])
    expect(c.texts).toHaveLength(6046)
    expect(c.y).toHaveLength(6046)
    expect(c.sources).toHaveLength(6046)
    const spam = c.y.reduce((n, v) => n + v, 0)
    expect(6046 - spam).toBe(4150)
    expect(spam).toBe(1896)
    const i = c.sources.findIndex((s) => s.startsWith("spam-assassin/spam-1/00001."))
    expect(c.y[i]).toBe(1)
    expect(c.texts[i].startsWith("Life Insurance - Why Pay More?\n")).toBe(true)
    expect(c.texts[i]).not.toMatch(/^(Received|Return-Path|Delivered-To|Message-ID):/m)
    expect(c.sources.filter((s, k) => s.includes("ham") !== (c.y[k] === 0))).toEqual([])
    // the whole corpus fits and encodes (bench/ measures how fast)
    const t = fitTokenizer(c.texts, 10_000, 64)
    expect(t.words).toHaveLength(9_998)
    const x = encodeMany(t, c.texts)
    expect(x).toHaveLength(6046 * 64)
    expect(decode(t, x.subarray(i * 64, i * 64 + 5))).toBe("life insurance why pay more")
  })

  describe("bad input is a LabelledDataError that says what, where and how", () => {
    it("unreadable path lists the bundled corpora", () => {
      expectBad(join(tmpdir(), "no-such-flotilla-corpus"), /unreadable.*spam-assassin/)
      expectBad(writeTmp("d.parquet", "x"), /neither a folder, a \.jsonl nor a \.csv/)
    })

    it("folders: empty class, not text, too many or too few classes", () => {
      expectBad(makeFolder({ ham: { "a.txt": "hi" }, spam: { "a.md": "x" } }), /empty class "spam"/)
      expectBad(makeFolder({ ham: { "a.txt": "hi" }, spam: { "bin.txt": new Uint8Array([104, 0, 105]) } }), /bin\.txt.*NUL/)
      expectBad(
        makeFolder({ ham: { "a.txt": "hi" }, spam: { "latin1.txt": new Uint8Array([0x63, 0x61, 0x66, 0xe9]) } }),
        /latin1\.txt.*not valid UTF-8/
      )
      expectBad(
        makeFolder({ a: { "1.txt": "x" }, b: { "1.txt": "y" }, c: { "1.txt": "z" } }),
        /3 classes \("a", "b", "c"\).*binary classifier/
      )
      expectBad(makeFolder({ ham: { "1.txt": "x" } }), /only one class \("ham"\)/)
      expectBad(makeFolder({}), /no class subfolders/)
    })

    it("jsonl: not JSON, missing text or label (with line numbers), one class, three classes, empty", () => {
      expectBad(writeTmp("d.jsonl", '{"text":"a","label":"x"}\n{oops\n'), /d\.jsonl:2 is not JSON/)
      expectBad(writeTmp("d.jsonl", '{"text":"a","label":"x"}\n\n{"label":"y"}\n'), /d\.jsonl:3 lacks a string "text"/)
      expectBad(writeTmp("d.jsonl", '{"text":"a"}\n'), /d\.jsonl:1 lacks a "label"/)
      expectBad(writeTmp("d.jsonl", '[1,2]\n'), /d\.jsonl:1 is not a JSON object/)
      expectBad(writeTmp("d.jsonl", '{"text":"a","label":"x"}\n{"text":"b","label":"x"}\n'), /only one class \("x"\)/)
      expectBad(
        writeTmp("d.jsonl", ["x", "y", "z"].map((l) => JSON.stringify({ text: "t", label: l })).join("\n")),
        /3 classes \("x", "y", "z"\).*binary/
      )
      expectBad(writeTmp("d.jsonl", "\n\n"), /empty/)
      expectBad(writeTmp("d.jsonl", new Uint8Array([123, 0, 125])), /d\.jsonl.*NUL/)
    })

    it("csv: missing columns, wrong column count, unclosed quote, empty", () => {
      expectBad(writeTmp("d.csv", "body,label\nhi,ham\n"), /no text column/)
      expectBad(writeTmp("d.csv", "text,class\nhi,ham\n"), /no label column/)
      expectBad(writeTmp("d.csv", "text,label\nhi,ham\nhi, there,spam\n"), /d\.csv:3 has 3 columns but the header has 2/)
      expectBad(writeTmp("d.csv", 'text,label\n"hi,ham\n'), /d\.csv:2.*never closed/)
      expectBad(writeTmp("d.csv", "text,label\nhi,\n"), /d\.csv:2 has an empty label/)
      expectBad(writeTmp("d.csv", "text,label\n"), /empty/)
      expectBad(writeTmp("d.csv", ""), /empty/)
    })
  })
})

describe("stratifiedSplit", () => {
  // 70 of class 0, 30 of class 1, interleaved
  const y = Uint8Array.from({ length: 100 }, (_, i) => (i % 10 < 7 ? 0 : 1))

  it("is deterministic for a seed and differs across seeds", () => {
    expect(stratifiedSplit(y, 0.2, 7)).toEqual(stratifiedSplit(y, 0.2, 7))
    expect(stratifiedSplit(y, 0.2, 8).val).not.toEqual(stratifiedSplit(y, 0.2, 7).val)
  })

  it("is stratified, disjoint, sorted and covers every index", () => {
    for (const [vf, seed] of [[0.2, 1], [0.1, 2], [0.33, 3], [0.5, 4]]) {
      const s = stratifiedSplit(y, vf, seed)
      for (const c of [0, 1]) {
        const n = y.filter((v) => v === c).length
        const nv = s.val.filter((i) => y[i] === c).length
        expect(Math.abs(nv - vf * n)).toBeLessThanOrEqual(1)
      }
      expect([...s.train, ...s.val].sort((a, b) => a - b)).toEqual(Array.from({ length: 100 }, (_, i) => i))
      expect(new Set([...s.train, ...s.val]).size).toBe(100)
      expect(s.train).toEqual([...s.train].sort((a, b) => a - b))
      expect(s.val).toEqual([...s.val].sort((a, b) => a - b))
    }
  })

  it("valFraction 0 gives an empty val; a small class still gets one val item", () => {
    expect(stratifiedSplit(y, 0, 1)).toEqual({ train: Array.from({ length: 100 }, (_, i) => i), val: [] })
    const small = Uint8Array.from([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1])
    const s = stratifiedSplit(small, 0.1, 1)
    expect(s.val.filter((i) => small[i] === 1)).toHaveLength(1)
    expect(s.val.filter((i) => small[i] === 0)).toHaveLength(1)
    expect(() => stratifiedSplit(y, 1, 1)).toThrow(LabelledDataError)
    expect(() => stratifiedSplit(y, -0.1, 1)).toThrow(LabelledDataError)
  })

  it("records the split as JSON-able counts and sources", () => {
    const root = makeFolder({ neg: { "1.txt": "a", "2.txt": "b", "3.txt": "c" }, pos: { "1.txt": "d", "2.txt": "e" } })
    const c = loadLabelled(root)
    const s = stratifiedSplit(c.y, 0.4, 5)
    const r = splitRecord(c, s, { seed: 5, valFraction: 0.4 })
    expect(JSON.parse(JSON.stringify(r))).toEqual(r)
    expect(r.corpus).toBe(root)
    expect(r.labels).toEqual(["neg", "pos"])
    expect(r.seed).toBe(5)
    expect(r.valFraction).toBe(0.4)
    expect(r.counts).toEqual({ train: { neg: 2, pos: 1 }, val: { neg: 1, pos: 1 } })
    expect(r.train).toEqual(s.train.map((i) => c.sources[i]))
    expect(r.val).toEqual(s.val.map((i) => c.sources[i]))
  })
})
