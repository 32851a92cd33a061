/**
 * Implements: loss curves without dependencies. `writeLossCurveSvg` draws a standalone SVG —
 * train loss as faint points plus a smoothed line, validation loss as markers, the learning
 * rate on a secondary axis, with ticks, labels, title and legend. `asciiChart` draws a small
 * block chart for the terminal (the end of `npm start`).
 * Does not own: collecting the numbers (the driver), progress output (progress.ts).
 *
 * Non-finite values (NaN, ±Infinity) are skipped, empty series are fine, one point is fine.
 */
import * as fs from "node:fs"
import * as path from "node:path"

/** (step, value) */
export type Point = readonly [step: number, value: number]

export interface LossCurves {
  readonly train: ReadonlyArray<Point>
  readonly val: ReadonlyArray<Point>
  readonly lr: ReadonlyArray<Point>
  /** validation accuracy in [0, 1] (classifiers): drawn on the right axis, the LR then drawn scaled to it without ticks. */
  readonly accuracy?: ReadonlyArray<Point> | undefined
  readonly title: string
  /** Half-width (in points) of the centred moving average drawn over the train loss; default ~1% of the points. */
  readonly smoothing?: number | undefined
}

// ---------------------------------------------------------------------------------------------
// Scales and ticks
// ---------------------------------------------------------------------------------------------

const clean = (ps: ReadonlyArray<Point> | undefined): Array<Point> =>
  (ps ?? []).filter((p) => Array.isArray(p) && Number.isFinite(p[0]) && Number.isFinite(p[1]))

/** "Nice" tick values (1, 2, 5 × 10^k, at least `minStep` apart) covering [lo, hi], about `count` of them. */
export const niceTicks = (lo: number, hi: number, count = 6, minStep = 0): Array<number> => {
  if (!Number.isFinite(lo) || !Number.isFinite(hi)) return []
  if (hi < lo) [lo, hi] = [hi, lo]
  if (hi === lo) {
    const pad = lo === 0 ? 1 : Math.abs(lo) * 0.1
    lo -= pad
    hi += pad
  }
  const raw = (hi - lo) / Math.max(1, count)
  const mag = Math.pow(10, Math.floor(Math.log10(raw)))
  const step = Math.max(minStep, [1, 2, 2.5, 5, 10].map((m) => m * mag).find((s) => s >= raw) ?? 10 * mag)
  const first = Math.floor(lo / step + 1e-9) * step
  const ticks: Array<number> = []
  for (let v = first; v <= hi + step * 1e-9 || ticks.length < 2; v += step) {
    ticks.push(Number(v.toPrecision(12)))
    if (ticks.length > 50) break
  }
  if (ticks[ticks.length - 1]! < hi - step * 1e-9) ticks.push(Number((first + ticks.length * step).toPrecision(12)))
  return ticks
}

/**
 * The label formatter for an axis with these ticks: `12k` for big integers, `1.5e-4` style when
 * the ticks are tiny (one mantissa precision for the whole axis), else just enough decimals.
 */
export const tickFormatter = (ticks: ReadonlyArray<number>): (v: number) => string => {
  const step = ticks.length > 1 ? Math.abs(ticks[1]! - ticks[0]!) : 1
  const maxAbs = Math.max(0, ...ticks.map(Math.abs))
  const exp = (x: number): number => Math.floor(Math.log10(x) + 1e-9)
  if (maxAbs > 0 && maxAbs < 1e-2) {
    const digits = Math.max(0, Math.min(3, exp(maxAbs) - exp(step)))
    return (v) => (v === 0 ? "0" : v.toExponential(digits))
  }
  const decimals = Math.max(0, Math.min(6, -exp(step)))
  return (v) =>
    v === 0 ? "0" : Math.abs(v) >= 1e4 && Number.isInteger(v) ? `${Number((v / 1000).toPrecision(4))}k` : v.toFixed(decimals)
}

const escapeXml = (s: string): string =>
  s.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;").replace(/"/g, "&quot;")

const f1 = (v: number): string => (Math.round(v * 10) / 10).toString()

/** Evenly keeps at most `max` points (first and last included). */
const thin = <T>(xs: ReadonlyArray<T>, max: number): Array<T> => {
  if (xs.length <= max) return xs.slice()
  const out: Array<T> = []
  for (let i = 0; i < max; i++) out.push(xs[Math.round((i * (xs.length - 1)) / (max - 1))]!)
  return out
}

/**
 * Centred moving average with half-width `k` (the window shrinks at the ends). The plot is drawn
 * after the fact, so unlike an EMA it need not lag behind a falling loss.
 */
export const smooth = (values: ReadonlyArray<number>, k: number): Array<number> => {
  const h = Math.max(0, Math.floor(k))
  const prefix = [0]
  for (const v of values) prefix.push(prefix[prefix.length - 1]! + v)
  return values.map((_, i) => {
    const a = Math.max(0, i - h)
    const b = Math.min(values.length, i + h + 1)
    return (prefix[b]! - prefix[a]!) / (b - a)
  })
}

const defaultHalfWindow = (n: number): number => Math.min(50, Math.floor(n / 100))

/** [min, max] widened by `frac` of the range on each side. */
const padded = (xs: ReadonlyArray<number>, frac: number): [number, number] => {
  if (xs.length === 0) return [0, 1]
  let lo = Infinity, hi = -Infinity
  for (const x of xs) {
    if (x < lo) lo = x
    if (x > hi) hi = x
  }
  const pad = (hi - lo) * frac
  return [lo - pad, hi + pad]
}

// ---------------------------------------------------------------------------------------------
// SVG
// ---------------------------------------------------------------------------------------------

const W = 960
const H = 540
const M = { left: 84, right: 84, top: 56, bottom: 64 }
const COLORS = { train: "#4c78a8", smooth: "#1f3f73", val: "#e45756", lr: "#54a24b", acc: "#b279a2", grid: "#e6e6e6", axis: "#333" }

/** The SVG document for these curves (pure). */
export const renderLossCurveSvg = (data: LossCurves): string => {
  const train = clean(data.train)
  const val = clean(data.val)
  const lr = clean(data.lr).filter((p) => p[1] >= 0)
  const acc = clean(data.accuracy ?? []).filter((p) => p[1] >= 0 && p[1] <= 1)
  const pw = W - M.left - M.right
  const ph = H - M.top - M.bottom
  const out: Array<string> = []
  out.push(
    `<svg xmlns="http://www.w3.org/2000/svg" width="${W}" height="${H}" viewBox="0 0 ${W} ${H}" font-family="Helvetica, Arial, sans-serif" font-size="12">`,
    `<rect width="${W}" height="${H}" fill="#fff"/>`,
    `<text id="title" x="${W / 2}" y="${M.top / 2 + 6}" text-anchor="middle" font-size="18" font-weight="bold">${
      escapeXml(data.title)
    }</text>`
  )

  const steps = [...train, ...val, ...lr, ...acc].map((p) => p[0])
  const losses = [...train, ...val].map((p) => p[1])
  const integerSteps = steps.length > 0 && steps.every(Number.isInteger)
  const xTicks = niceTicks(...padded(steps, 0), 8, integerSteps ? 1 : 0)
  const yTicks = niceTicks(...padded(losses, 0.04), 6)
  const lrTicks = lr.length ? niceTicks(0, padded(lr.map((p) => p[1]), 0.04)[1], 6) : []
  const accTicks = [0, 0.2, 0.4, 0.6, 0.8, 1]
  const sa = (v: number): number => M.top + ph - v * ph
  const x0 = xTicks[0]!, x1 = xTicks[xTicks.length - 1]!
  const y0 = yTicks[0]!, y1 = yTicks[yTicks.length - 1]!
  const sx = (v: number): number => M.left + ((v - x0) / (x1 - x0)) * pw
  const sy = (v: number): number => M.top + ph - ((v - y0) / (y1 - y0)) * ph
  const lrMax = lrTicks[lrTicks.length - 1] ?? 1
  const sl = (v: number): number => M.top + ph - (v / (lrMax || 1)) * ph
  const xLabel = tickFormatter(xTicks)
  const yLabel = tickFormatter(yTicks)
  const lrLabel = tickFormatter(lrTicks)

  // Grid, axes, ticks
  out.push(`<g id="grid" stroke="${COLORS.grid}" stroke-width="1">`)
  for (const t of xTicks) out.push(`<line x1="${f1(sx(t))}" y1="${M.top}" x2="${f1(sx(t))}" y2="${M.top + ph}"/>`)
  for (const t of yTicks) out.push(`<line x1="${M.left}" y1="${f1(sy(t))}" x2="${M.left + pw}" y2="${f1(sy(t))}"/>`)
  out.push(`</g>`)
  out.push(`<g id="axes" stroke="${COLORS.axis}" fill="none" stroke-width="1">`)
  out.push(`<rect x="${M.left}" y="${M.top}" width="${pw}" height="${ph}"/>`)
  out.push(`</g>`)
  out.push(`<g id="x-ticks" fill="${COLORS.axis}" text-anchor="middle">`)
  for (const t of xTicks) {
    out.push(
      `<line x1="${f1(sx(t))}" y1="${M.top + ph}" x2="${f1(sx(t))}" y2="${M.top + ph + 5}" stroke="${COLORS.axis}"/>`,
      `<text x="${f1(sx(t))}" y="${M.top + ph + 19}">${xLabel(t)}</text>`
    )
  }
  out.push(`</g>`)
  out.push(`<g id="y-ticks" fill="${COLORS.axis}" text-anchor="end">`)
  for (const t of yTicks) {
    out.push(
      `<line x1="${M.left - 5}" y1="${f1(sy(t))}" x2="${M.left}" y2="${f1(sy(t))}" stroke="${COLORS.axis}"/>`,
      `<text x="${M.left - 8}" y="${f1(sy(t) + 4)}">${yLabel(t)}</text>`
    )
  }
  out.push(`</g>`)
  out.push(
    `<text x="${M.left + pw / 2}" y="${H - 18}" text-anchor="middle" font-size="14">step</text>`,
    `<text transform="translate(22 ${M.top + ph / 2}) rotate(-90)" text-anchor="middle" font-size="14">loss</text>`
  )
  if (acc.length > 0) {
    out.push(`<g id="acc-ticks" fill="${COLORS.acc}" text-anchor="start">`)
    for (const t of accTicks) {
      out.push(
        `<line x1="${M.left + pw}" y1="${f1(sa(t))}" x2="${M.left + pw + 5}" y2="${f1(sa(t))}" stroke="${COLORS.acc}"/>`,
        `<text x="${M.left + pw + 8}" y="${f1(sa(t) + 4)}">${Math.round(t * 100)}%</text>`
      )
    }
    out.push(`</g>`)
    out.push(
      `<text transform="translate(${W - 16} ${M.top + ph / 2}) rotate(90)" text-anchor="middle" font-size="14" fill="${COLORS.acc}">validation accuracy</text>`
    )
  } else if (lrTicks.length > 0) {
    out.push(`<g id="lr-ticks" fill="${COLORS.lr}" text-anchor="start">`)
    for (const t of lrTicks) {
      out.push(
        `<line x1="${M.left + pw}" y1="${f1(sl(t))}" x2="${M.left + pw + 5}" y2="${f1(sl(t))}" stroke="${COLORS.lr}"/>`,
        `<text x="${M.left + pw + 8}" y="${f1(sl(t) + 4)}">${lrLabel(t)}</text>`
      )
    }
    out.push(`</g>`)
    out.push(
      `<text transform="translate(${W - 16} ${M.top + ph / 2}) rotate(90)" text-anchor="middle" font-size="14" fill="${COLORS.lr}">learning rate</text>`
    )
  }

  if (train.length + val.length + lr.length + acc.length === 0) {
    out.push(`<text x="${M.left + pw / 2}" y="${M.top + ph / 2}" text-anchor="middle" font-size="16" fill="#888">no data</text>`)
  }

  const pathOf = (ps: ReadonlyArray<readonly [number, number]>, fy: (v: number) => number): string =>
    ps.map((p, i) => `${i === 0 ? "M" : "L"}${f1(sx(p[0]))} ${f1(fy(p[1]))}`).join(" ")

  // Series, clipped to the plot area
  out.push(`<clipPath id="plot-area"><rect x="${M.left}" y="${M.top}" width="${pw}" height="${ph}"/></clipPath>`)
  out.push(`<g clip-path="url(#plot-area)">`)
  if (lr.length > 0) {
    out.push(
      `<path id="lr" data-series="lr" data-count="${lr.length}" d="${pathOf(thin(lr, 2000), sl)}" fill="none" stroke="${COLORS.lr}" stroke-width="1.5" stroke-dasharray="6 4"/>`
    )
  }
  if (train.length > 0) {
    out.push(`<g id="train-points" data-series="train" data-count="${train.length}" fill="${COLORS.train}" fill-opacity="0.35">`)
    const r = train.length < 200 ? 3 : 1.8
    for (const p of thin(train, 1500)) out.push(`<circle cx="${f1(sx(p[0]))}" cy="${f1(sy(p[1]))}" r="${r}"/>`)
    out.push(`</g>`)
    const sm = smooth(train.map((p) => p[1]), data.smoothing ?? defaultHalfWindow(train.length))
    const smoothed = train.map((p, i): readonly [number, number] => [p[0], sm[i]!])
    out.push(
      `<path id="train-smoothed" data-series="train-smoothed" data-count="${smoothed.length}" d="${
        pathOf(thin(smoothed, 2000), sy)
      }" fill="none" stroke="${COLORS.smooth}" stroke-width="2.2" stroke-linejoin="round"/>`
    )
  }
  if (val.length > 0) {
    if (val.length > 1) {
      out.push(`<path d="${pathOf(val, sy)}" fill="none" stroke="${COLORS.val}" stroke-width="1" stroke-opacity="0.6"/>`)
    }
    out.push(`<g id="val" data-series="val" data-count="${val.length}" fill="${COLORS.val}" stroke="#fff" stroke-width="1">`)
    for (const p of thin(val, 500)) {
      const cx = sx(p[0]), cy = sy(p[1])
      out.push(`<path d="M${f1(cx)} ${f1(cy - 5.5)} L${f1(cx + 5.5)} ${f1(cy)} L${f1(cx)} ${f1(cy + 5.5)} L${f1(cx - 5.5)} ${f1(cy)} Z"/>`)
    }
    out.push(`</g>`)
  }
  if (acc.length > 0) {
    out.push(`<path id="accuracy" data-series="accuracy" data-count="${acc.length}" d="${pathOf(acc, sa)}" fill="none" stroke="${COLORS.acc}" stroke-width="2"/>`)
    out.push(`<g fill="${COLORS.acc}">`)
    for (const p of thin(acc, 500)) out.push(`<circle cx="${f1(sx(p[0]))}" cy="${f1(sa(p[1]))}" r="3"/>`)
    out.push(`</g>`)
  }
  out.push(`</g>`)

  // Legend (top right, inside the plot)
  const fmt = (v: number | undefined): string => (v === undefined ? "" : ` (last ${v.toPrecision(4)})`)
  const entries: Array<{ label: string; swatch: (x: number, y: number) => string }> = []
  if (train.length > 0) {
    entries.push({
      label: "train loss",
      swatch: (x, y) => `<circle cx="${x + 12}" cy="${y}" r="3" fill="${COLORS.train}" fill-opacity="0.5"/>`
    })
    const last = smooth(train.map((p) => p[1]), data.smoothing ?? defaultHalfWindow(train.length)).at(-1)
    entries.push({
      label: `train, smoothed${fmt(last)}`,
      swatch: (x, y) => `<line x1="${x}" y1="${y}" x2="${x + 24}" y2="${y}" stroke="${COLORS.smooth}" stroke-width="2.2"/>`
    })
  }
  if (val.length > 0) {
    entries.push({
      label: `val loss${fmt(val.at(-1)?.[1])}`,
      swatch: (x, y) => `<path d="M${x + 12} ${y - 5} L${x + 17} ${y} L${x + 12} ${y + 5} L${x + 7} ${y} Z" fill="${COLORS.val}"/>`
    })
  }
  if (lr.length > 0) {
    entries.push({
      label: acc.length > 0 ? "learning rate (scaled to its max)" : "learning rate (right axis)",
      swatch: (x, y) => `<line x1="${x}" y1="${y}" x2="${x + 24}" y2="${y}" stroke="${COLORS.lr}" stroke-width="1.5" stroke-dasharray="6 4"/>`
    })
  }
  if (acc.length > 0) {
    entries.push({
      label: `val accuracy (right axis)${acc.length ? ` (last ${(100 * acc.at(-1)![1]).toFixed(1)}%)` : ""}`,
      swatch: (x, y) => `<line x1="${x}" y1="${y}" x2="${x + 24}" y2="${y}" stroke="${COLORS.acc}" stroke-width="2"/>`
    })
  }
  if (entries.length > 0) {
    const lw = 32 + Math.max(...entries.map((e) => e.label.length)) * 6.6
    const lh = 10 + entries.length * 20
    const lx = M.left + pw - lw - 10
    const ly = M.top + 10
    out.push(`<g id="legend">`)
    out.push(`<rect x="${f1(lx)}" y="${ly}" width="${f1(lw)}" height="${lh}" fill="#fff" fill-opacity="0.85" stroke="#bbb"/>`)
    entries.forEach((e, i) => {
      const y = ly + 15 + i * 20
      out.push(e.swatch(lx + 8, y), `<text x="${f1(lx + 40)}" y="${y + 4}">${escapeXml(e.label)}</text>`)
    })
    out.push(`</g>`)
  }
  out.push(`</svg>`)
  return out.join("\n") + "\n"
}

/** Writes the loss-curve SVG to `file` (creating its folder) and returns `file`. */
export const writeLossCurveSvg = (file: string, data: LossCurves): string => {
  fs.mkdirSync(path.dirname(file), { recursive: true })
  fs.writeFileSync(file, renderLossCurveSvg(data))
  return file
}

// ---------------------------------------------------------------------------------------------
// Terminal chart
// ---------------------------------------------------------------------------------------------

const EIGHTHS = [" ", "▁", "▂", "▃", "▄", "▅", "▆", "▇", "█"]

/**
 * A block chart of `values`, `height` rows by at most `width` columns (longer series are
 * averaged into columns), with the max and min labelled on the left. NaNs are skipped.
 */
export const asciiChart = (values: ReadonlyArray<number>, width = 60, height = 8): string => {
  const finite = values.filter((v) => Number.isFinite(v))
  if (finite.length === 0) return "(no data)"
  const w = Math.max(1, Math.floor(width))
  const h = Math.max(1, Math.floor(height))
  const cols: Array<number> = []
  const n = values.length
  const ncols = Math.min(w, n)
  for (let c = 0; c < ncols; c++) {
    let sum = 0
    let k = 0
    for (let i = Math.floor((c * n) / ncols); i < Math.floor(((c + 1) * n) / ncols); i++) {
      const v = values[i]!
      if (Number.isFinite(v)) {
        sum += v
        k++
      }
    }
    cols.push(k === 0 ? NaN : sum / k)
  }
  const plotted = cols.filter((v) => Number.isFinite(v))
  const lo = Math.min(...plotted)
  const hi = Math.max(...plotted)
  const span = hi - lo
  const levels = cols.map((v) =>
    Number.isFinite(v) ? 1 + Math.round((span === 0 ? 0.5 : (v - lo) / span) * (h * 8 - 1)) : 0
  )
  const top = Number(hi.toPrecision(4)).toString()
  const bottom = Number(lo.toPrecision(4)).toString()
  const lw = Math.max(top.length, bottom.length)
  const lines: Array<string> = []
  for (let r = h - 1; r >= 0; r--) {
    const label = r === h - 1 && span > 0
      ? top.padStart(lw) + " ┤"
      : r === 0
      ? bottom.padStart(lw) + " ┤"
      : " ".repeat(lw) + " │"
    lines.push(label + levels.map((l) => EIGHTHS[Math.max(0, Math.min(8, l - r * 8))]).join(""))
  }
  return lines.join("\n")
}
