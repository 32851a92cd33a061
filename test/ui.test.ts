/**
 * Tests: training UX — progress formatting, the ETA's moving average, TTY redraw and non-TTY
 * throttling (with a fake clock and stream), and the loss-curve SVG (parsed as XML: well
 * formed, the expected series) and terminal chart, including empty / NaN / one-point data.
 * Run: npx vitest run test/ui.test.ts
 */
import { describe, expect, it } from "@effect/vitest"
import * as fs from "node:fs"
import * as os from "node:os"
import * as path from "node:path"
import { asciiChart, niceTicks, renderLossCurveSvg, smooth, tickFormatter, writeLossCurveSvg } from "../shared/ui/plot.ts"
import {
  formatDuration,
  formatLoss,
  formatLr,
  formatPlainLine,
  formatRate,
  formatTtyLine,
  type LineState,
  makeProgress,
  makeStepTimer,
  plainLineDue,
  renderBar
} from "../shared/ui/progress.ts"

// ---------------------------------------------------------------------------------------------
// A strict little XML reader: enough to say an SVG is well formed and to walk it.
// ---------------------------------------------------------------------------------------------

interface XmlNode {
  readonly name: string
  readonly attrs: Record<string, string>
  readonly children: Array<XmlNode>
  text: string
}

const ENTITY = /&(?!(amp|lt|gt|quot|apos|#\d+|#x[0-9a-fA-F]+);)/

const parseXml = (src: string): XmlNode => {
  const tokens = src.match(/<!--[\s\S]*?-->|<\?[\s\S]*?\?>|<[^>]*>|[^<]+/g) ?? []
  if (tokens.join("") !== src) throw new Error("stray '<'")
  const root: XmlNode = { name: "#document", attrs: {}, children: [], text: "" }
  const stack: Array<XmlNode> = [root]
  for (const t of tokens) {
    const top = stack[stack.length - 1]!
    if (t.startsWith("<!--") || t.startsWith("<?")) continue
    if (!t.startsWith("<")) {
      if (ENTITY.test(t)) throw new Error(`unescaped & in text ${JSON.stringify(t)}`)
      if (stack.length === 1 && t.trim() !== "") throw new Error("text outside the root element")
      top.text += t
      continue
    }
    const close = /^<\/([A-Za-z_][-\w.:]*)\s*>$/.exec(t)
    if (close) {
      if (top.name !== close[1]) throw new Error(`</${close[1]}> closes <${top.name}>`)
      stack.pop()
      continue
    }
    const open = /^<([A-Za-z_][-\w.:]*)((?:\s+[A-Za-z_:][-\w.:]*\s*=\s*"[^"<]*")*)\s*(\/?)>$/.exec(t)
    if (!open) throw new Error(`malformed tag ${t}`)
    const attrs: Record<string, string> = {}
    for (const m of open[2]!.matchAll(/([A-Za-z_:][-\w.:]*)\s*=\s*"([^"<]*)"/g)) {
      if (m[1]! in attrs) throw new Error(`duplicate attribute ${m[1]} in ${t}`)
      if (ENTITY.test(m[2]!)) throw new Error(`unescaped & in attribute ${m[1]}`)
      attrs[m[1]!] = m[2]!
    }
    const node: XmlNode = { name: open[1]!, attrs, children: [], text: "" }
    if (stack.length === 1 && root.children.length > 0) throw new Error("two root elements")
    top.children.push(node)
    if (open[3] !== "/") stack.push(node)
  }
  if (stack.length !== 1) throw new Error(`<${stack[stack.length - 1]!.name}> is never closed`)
  if (root.children.length !== 1) throw new Error("no root element")
  return root.children[0]!
}

const all = (n: XmlNode): Array<XmlNode> => [n, ...n.children.flatMap(all)]
const byId = (n: XmlNode, id: string): XmlNode | undefined => all(n).find((x) => x.attrs.id === id)
const unescape = (s: string): string =>
  s.replace(/&lt;/g, "<").replace(/&gt;/g, ">").replace(/&quot;/g, "\"").replace(/&amp;/g, "&")

// ---------------------------------------------------------------------------------------------

const state = (over: Partial<LineState> = {}): LineState => ({
  label: "train",
  step: 250,
  total: 1000,
  loss: 3.14159,
  valLoss: undefined,
  tokensPerSec: 12_345,
  lr: 3e-4,
  etaSeconds: 125,
  elapsedSeconds: 42,
  ...over
})

const fakeStream = (isTTY: boolean, columns = 100) => {
  const writes: Array<string> = []
  return { writes, stream: { isTTY, columns, write: (s: string) => writes.push(s) } }
}

describe("progress formatting", () => {
  it("formats durations, rates, losses and learning rates", () => {
    expect(formatDuration(undefined)).toBe("--")
    expect(formatDuration(NaN)).toBe("--")
    expect(formatDuration(42.4)).toBe("42s")
    expect(formatDuration(185)).toBe("3m05s")
    expect(formatDuration(3720)).toBe("1h02m")
    expect(formatDuration(200 * 3600)).toBe("8d08h")
    expect(formatRate(950)).toBe("950 tok/s")
    expect(formatRate(1234)).toBe("1.23k tok/s")
    expect(formatRate(12_345)).toBe("12.3k tok/s")
    expect(formatRate(2_500_000)).toBe("2.50M tok/s")
    expect(formatRate(NaN)).toBe("-- tok/s")
    expect(formatLoss(3.14159)).toBe("3.142")
    expect(formatLoss(NaN)).toBe("nan")
    expect(formatLoss(Infinity)).toBe("inf")
    expect(formatLr(3e-4)).toBe("3.0e-4")
    expect(formatLr(0)).toBe("0")
  })

  it("draws bars of exactly the asked width", () => {
    for (const f of [0, 0.01, 0.333, 0.5, 0.999, 1, -1, 2, NaN]) {
      for (const w of [0, 1, 7, 30]) expect([...renderBar(f, w)]).toHaveLength(w)
    }
    expect(renderBar(1, 4)).toBe("████")
    expect(renderBar(0, 4)).toBe("    ")
    expect(renderBar(0.5, 4)).toBe("██  ")
  })

  it("fits the TTY line to the terminal and shows every field", () => {
    const wide = formatTtyLine(state({ valLoss: 3.3 }), 140)
    expect(wide).toContain(" 250/1000")
    expect(wide).toContain("loss 3.142")
    expect(wide).toContain("val 3.300")
    expect(wide).toContain("12.3k tok/s")
    expect(wide).toContain("lr 3.0e-4")
    expect(wide).toContain("ETA 2m05s")
    expect(wide).toContain("█")
    for (const cols of [30, 60, 80, 100, 200]) expect(formatTtyLine(state(), cols).length).toBeLessThan(cols)
    expect(formatPlainLine(state())).toBe(
      "train step  250/1000 (25%) loss 3.142 12.3k tok/s lr 3.0e-4 elapsed 42s eta 2m05s"
    )
  })

  it("a classifier's line: the epoch, validation accuracy and samples/s", () => {
    const cls = state({ valLoss: 0.21, valAccuracy: 0.9634, epoch: { done: 7, of: 50 }, unit: "samples", tokensPerSec: 690 })
    expect(formatPlainLine(cls)).toBe("train step  250/1000 (25%) epoch 7/50 loss 3.142 val 0.2100 acc 96.3% 690 samples/s lr 3.0e-4 elapsed 42s eta 2m05s")
    const tty = formatTtyLine(cls, 160)
    for (const part of ["epoch 7/50", "val 0.2100 acc 96.3%", "690 samples/s"]) expect(tty).toContain(part)
  })
})

describe("ETA", () => {
  it("is the smoothed time per step times the steps left", () => {
    const t = makeStepTimer(0.5)
    expect(t.eta(100)).toBeUndefined()
    t.observe(0, 0)
    expect(t.secondsPerStep).toBeUndefined()
    t.observe(10, 1000)
    expect(t.secondsPerStep).toBeCloseTo(0.1)
    t.observe(20, 2000)
    expect(t.secondsPerStep).toBeCloseTo(0.1)
    expect(t.eta(100)).toBeCloseTo(8)
    // A slow step moves the estimate, but only part of the way.
    t.observe(21, 2000 + 1000)
    expect(t.secondsPerStep!).toBeGreaterThan(0.1)
    expect(t.secondsPerStep!).toBeLessThan(1)
    // Repeated or backwards steps are ignored.
    const before = t.secondsPerStep
    t.observe(21, 9000)
    t.observe(5, 9500)
    expect(t.secondsPerStep).toBe(before)
  })
})

describe("progress reporter", () => {
  it("prints few plain lines on a non-TTY however fast steps come", () => {
    let now = 0
    const { writes, stream } = fakeStream(false)
    const p = makeProgress({ total: 10_000, label: "run", stream, now: () => now })
    for (let step = 1; step <= 10_000; step++) {
      now += 5 // 50 s in all
      p.update({ step, loss: 10 - step / 2000, tokensPerSec: 5000 })
    }
    p.done()
    // first + one per 10% (minus those within the 2 s minimum gap) + time-based + final
    expect(writes.length).toBeGreaterThanOrEqual(5)
    expect(writes.length).toBeLessThanOrEqual(14)
    for (const w of writes) {
      expect(w.endsWith("\n")).toBe(true)
      expect(w).not.toContain("\r")
      expect(w).not.toContain("\x1b")
    }
    expect(writes[writes.length - 2]).toMatch(/step 10000\/10000 \(100%\)/)
    expect(writes[writes.length - 1]).toBe("run done in 50s\n")
  })

  it("prints a line at least every `everySeconds` while progress is slow", () => {
    let now = 0
    const { writes, stream } = fakeStream(false)
    const p = makeProgress({ total: 1000, label: "slow", stream, now: () => now, everySeconds: 30 })
    for (let step = 1; step <= 20; step++) {
      now += 10_000 // 10 s per step, 2% of the run: 200 s for 20 steps
      p.update({ step, loss: 5, tokensPerSec: 100 })
    }
    // first line, then one per 30 s: steps 1, 4, 7, ..., 19 → 7 lines
    expect(writes).toHaveLength(7)
  })

  it("never prints two plain lines in the same instant", () => {
    const { writes, stream } = fakeStream(false)
    const p = makeProgress({ total: 100, label: "burst", stream, now: () => 0 })
    for (let step = 1; step <= 100; step++) p.update({ step, loss: 1, tokensPerSec: 1 })
    expect(writes).toHaveLength(1)
    p.done()
    p.done()
    p.update({ step: 100, loss: 1, tokensPerSec: 1 })
    expect(writes).toHaveLength(2)
    expect(writes[1]).toMatch(/^burst step 100\/100 \(100%\) .* done\n$/)
  })

  it("redraws one line on a TTY, at most every redrawMs, and ends it", () => {
    let now = 0
    const { writes, stream } = fakeStream(true, 120)
    const p = makeProgress({ total: 1000, label: "tty", stream, now: () => now })
    for (let step = 1; step <= 1000; step++) {
      now += 1
      p.update({ step, loss: 2, valLoss: step === 500 ? 2.2 : undefined, tokensPerSec: 1000, lr: 1e-3 })
    }
    p.done()
    expect(writes.length).toBeLessThanOrEqual(1000 / 100 + 2)
    for (const w of writes) {
      expect(w.startsWith("\r")).toBe(true)
      expect(w).toContain("\x1b[K")
    }
    const last = writes[writes.length - 1]!
    expect(last.endsWith("\n")).toBe(true)
    expect(last).toContain("val 2.200") // the last validation loss stays on the line
    expect(last).toContain("1000/1000")
  })

  it("decides plain lines by percent, time and minimum gap", () => {
    const base = { total: 100, everyPercent: 10, everySeconds: 30, minGapSeconds: 2 }
    expect(plainLineDue({ ...base, step: 1, lastStep: undefined, nowMs: 0, lastMs: undefined })).toBe(true)
    expect(plainLineDue({ ...base, step: 9, lastStep: 1, nowMs: 5000, lastMs: 0 })).toBe(false)
    expect(plainLineDue({ ...base, step: 10, lastStep: 9, nowMs: 5000, lastMs: 0 })).toBe(true)
    expect(plainLineDue({ ...base, step: 10, lastStep: 9, nowMs: 1000, lastMs: 0 })).toBe(false)
    expect(plainLineDue({ ...base, step: 3, lastStep: 2, nowMs: 31_000, lastMs: 0 })).toBe(true)
    expect(plainLineDue({ ...base, step: 2, lastStep: 2, nowMs: 31_000, lastMs: 0 })).toBe(false)
  })
})

describe("loss-curve SVG", () => {
  const curves = () => {
    const train: Array<[number, number]> = []
    const val: Array<[number, number]> = []
    const lr: Array<[number, number]> = []
    for (let i = 0; i <= 500; i++) {
      train.push([i, i === 100 ? NaN : 2 + 8 * Math.exp(-i / 80) + 0.1 * Math.sin(i)])
      lr.push([i, i < 50 ? (3e-4 * i) / 50 : 3e-4 * (1 - (i - 50) / 450)])
      if (i % 100 === 0) val.push([i, 2.2 + 8 * Math.exp(-i / 80)])
    }
    return { train, val, lr, title: "gpt <tiny> & \"friends\"" }
  }

  it("is well-formed XML with the expected series, axes and legend", () => {
    const svg = parseXml(renderLossCurveSvg(curves()))
    expect(svg.name).toBe("svg")
    expect(svg.attrs.xmlns).toBe("http://www.w3.org/2000/svg")
    expect(unescape(byId(svg, "title")!.text)).toBe("gpt <tiny> & \"friends\"")
    const points = byId(svg, "train-points")!
    expect(points.attrs["data-count"]).toBe("500") // the NaN is dropped
    expect(points.children.filter((c) => c.name === "circle")).toHaveLength(500)
    expect(byId(svg, "train-smoothed")!.attrs.d).toMatch(/^M[\d.]+ [\d.]+( L[\d.]+ [\d.]+)+$/)
    expect(byId(svg, "val")!.children).toHaveLength(6)
    expect(byId(svg, "lr")!.attrs["data-count"]).toBe("501")
    expect(byId(svg, "lr-ticks")!.children.some((c) => c.name === "text" && c.text === "3e-4")).toBe(true)
    const legend = byId(svg, "legend")!.children.filter((c) => c.name === "text").map((c) => c.text)
    expect(legend).toHaveLength(4)
    expect(legend.join(" ")).toContain("val loss")
    const xLabels = byId(svg, "x-ticks")!.children.filter((c) => c.name === "text").map((c) => c.text)
    expect(xLabels[0]).toBe("0")
    expect(xLabels).toContain("500")
    // every coordinate is a number: no NaN leaked into the drawing
    expect(renderLossCurveSvg(curves())).not.toMatch(/NaN|Infinity|undefined/)
  })

  it("draws a classifier's validation accuracy on the right axis (0-100%)", () => {
    const acc: Array<[number, number]> = [[100, 0.7], [200, 0.9], [300, 0.95]]
    const svg = parseXml(renderLossCurveSvg({ ...curves(), accuracy: acc }))
    expect(byId(svg, "accuracy")!.attrs["data-count"]).toBe("3")
    expect(byId(svg, "acc-ticks")!.children.filter((c) => c.name === "text").map((c) => c.text)).toEqual(["0%", "20%", "40%", "60%", "80%", "100%"])
    expect(byId(svg, "lr-ticks")).toBeUndefined()
    const legend = byId(svg, "legend")!.children.filter((c) => c.name === "text").map((c) => c.text).join(" ")
    expect(legend).toContain("val accuracy (right axis) (last 95.0%)")
  })

  it("handles empty, all-NaN and single-point series", () => {
    const cases = [
      { train: [], val: [], lr: [], title: "empty" },
      { train: [[0, NaN], [1, Infinity]] as Array<[number, number]>, val: [], lr: [[0, NaN]] as Array<[number, number]>, title: "nan" },
      { train: [[5, 3.2]] as Array<[number, number]>, val: [[5, 3.3]] as Array<[number, number]>, lr: [[5, 1e-3]] as Array<[number, number]>, title: "one" },
      { train: [[1, 2], [2, 2], [3, 2]] as Array<[number, number]>, val: [], lr: [], title: "flat" }
    ]
    for (const c of cases) {
      const text = renderLossCurveSvg(c)
      expect(text).not.toMatch(/NaN|Infinity|undefined/)
      const svg = parseXml(text)
      expect(svg.name).toBe("svg")
    }
    expect(all(parseXml(renderLossCurveSvg(cases[0]!))).some((n) => n.text === "no data")).toBe(true)
    expect(byId(parseXml(renderLossCurveSvg(cases[2]!)), "train-points")!.children).toHaveLength(1)
  })

  it("writes the file (creating the folder) and returns its path", () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), "flotilla-plot-"))
    try {
      const file = path.join(dir, "runs", "loss.svg")
      expect(writeLossCurveSvg(file, curves())).toBe(file)
      expect(parseXml(fs.readFileSync(file, "utf8")).name).toBe("svg")
    } finally {
      fs.rmSync(dir, { recursive: true, force: true })
    }
  })

  it("picks nice ticks and labels", () => {
    expect(niceTicks(0, 1000, 8)).toEqual([0, 200, 400, 600, 800, 1000])
    expect(niceTicks(2.03, 9.87, 6)).toEqual([2, 4, 6, 8, 10])
    expect(niceTicks(5, 5, 8, 1)).toEqual([4, 5, 6])
    expect(niceTicks(NaN, 1)).toEqual([])
    expect([0, 1e-4, 2e-4, 3e-4].map(tickFormatter([0, 1e-4, 2e-4, 3e-4]))).toEqual(["0", "1e-4", "2e-4", "3e-4"])
    expect([1.5e-4, 3e-4].map(tickFormatter([0, 5e-5, 1e-4, 1.5e-4, 3e-4]))).toEqual(["1.5e-4", "3.0e-4"])
    expect([0, 20_000, 40_000].map(tickFormatter([0, 20_000, 40_000]))).toEqual(["0", "20k", "40k"])
    expect([2, 2.5, 3].map(tickFormatter([2, 2.5, 3]))).toEqual(["2.0", "2.5", "3.0"])
    expect(smooth([1, 2, 3, 4, 5], 1)).toEqual([1.5, 2, 3, 4, 4.5])
  })
})

describe("ascii chart", () => {
  it("draws height rows of at most width columns, labelled with max and min", () => {
    const values = Array.from({ length: 300 }, (_, i) => 10 * Math.exp(-i / 60) + 1)
    const chart = asciiChart(values, 40, 6)
    const lines = chart.split("\n")
    expect(lines).toHaveLength(6)
    const label = lines[0]!.indexOf("┤") + 1
    for (const l of lines) expect([...l.slice(label)]).toHaveLength(40)
    expect(lines[0]).toMatch(/^\s*\d+(\.\d+)? ┤█/) // the first column is the highest
    expect(lines[5]).toMatch(/^\s*\d+(\.\d+)? ┤█+/)
  })

  it("skips NaNs and handles empty, constant and tiny series", () => {
    expect(asciiChart([], 10, 3)).toBe("(no data)")
    expect(asciiChart([NaN, NaN], 10, 3)).toBe("(no data)")
    expect(asciiChart([1, NaN, 3], 10, 2).split("\n")).toHaveLength(2)
    expect(asciiChart([3, 3, 3], 10, 3).split("\n")).toHaveLength(3)
    expect(asciiChart([42], 10, 1)).toMatch(/42 ┤./)
  })
})
