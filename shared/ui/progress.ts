/**
 * Implements: the progress reporter of a long training run. On a TTY, one line redrawn in place
 * (bar, step/total, loss, val loss, tokens/s, lr, ETA), at most ~10 times a second. Elsewhere
 * (CI, log files), a plain line when the run crosses the next `everyPercent`% or `everySeconds`
 * have passed since the last line, never more often than `minGapSeconds`: a log stays short.
 * The ETA comes from an exponential moving average of the time per step.
 * Does not own: measuring loss or throughput (the driver passes them in), plots (plot.ts).
 *
 * The formatting functions are pure and exported for tests.
 */

export interface ProgressUpdate {
  readonly step: number
  readonly loss: number
  readonly valLoss?: number | undefined
  readonly tokensPerSec: number
  readonly lr?: number | undefined
  /** validation accuracy (classifiers), shown as `acc`. */
  readonly valAccuracy?: number | undefined
  /** a job bounded by epochs: complete epochs and the limit (shown as `epoch d/n`). */
  readonly epoch?: { readonly done: number; readonly of: number } | undefined
  /** the total steps as now estimated (a job bounded by epochs learns it as it runs). */
  readonly total?: number | undefined
  /** what tokensPerSec counts: "tok" (default) or "samples". */
  readonly unit?: "tok" | "samples" | undefined
}

export interface ProgressStream {
  write(chunk: string): unknown
  readonly isTTY?: boolean | undefined
  readonly columns?: number | undefined
}

export interface ProgressOptions {
  readonly total: number
  readonly label: string
  /** Defaults to process.stderr. */
  readonly stream?: ProgressStream | undefined
  /** Force TTY / plain mode; defaults to `stream.isTTY`. */
  readonly tty?: boolean | undefined
  /** Clock in milliseconds (tests pass a fake one). */
  readonly now?: (() => number) | undefined
  /** Plain mode: a line each time progress crosses a multiple of this percentage (default 10). */
  readonly everyPercent?: number | undefined
  /** Plain mode: a line at least this often while steps arrive (default 30). */
  readonly everySeconds?: number | undefined
  /** Plain mode: never two lines closer than this (default 2); the first and last always print. */
  readonly minGapSeconds?: number | undefined
  /** TTY mode: minimum time between redraws (default 100 ms). */
  readonly redrawMs?: number | undefined
  /** Smoothing factor of the step-time EMA, 0 < alpha <= 1 (default 0.1). */
  readonly alpha?: number | undefined
}

export interface Progress {
  update(u: ProgressUpdate): void
  /** Final line (and newline on a TTY). Further updates are ignored. */
  done(): void
}

// ---------------------------------------------------------------------------------------------
// Pure formatting
// ---------------------------------------------------------------------------------------------

/** `1h02m`, `3m05s`, `42s`, `--` (unknown). */
export const formatDuration = (seconds: number | undefined): string => {
  if (seconds === undefined || !Number.isFinite(seconds) || seconds < 0) return "--"
  const s = Math.round(seconds)
  if (s < 60) return `${s}s`
  if (s < 3600) return `${Math.floor(s / 60)}m${String(s % 60).padStart(2, "0")}s`
  if (s < 100 * 3600) return `${Math.floor(s / 3600)}h${String(Math.floor((s % 3600) / 60)).padStart(2, "0")}m`
  return `${Math.floor(s / 86400)}d${String(Math.floor((s % 86400) / 3600)).padStart(2, "0")}h`
}

/** `950 tok/s`, `12.3k tok/s`, `1.20M tok/s` (or `samples/s`). */
export const formatRate = (tokensPerSec: number, unit: "tok" | "samples" = "tok"): string => {
  if (!Number.isFinite(tokensPerSec) || tokensPerSec < 0) return `-- ${unit}/s`
  if (tokensPerSec < 1000) return `${Math.round(tokensPerSec)} ${unit}/s`
  if (tokensPerSec < 1e6) return `${(tokensPerSec / 1e3).toFixed(tokensPerSec < 1e4 ? 2 : 1)}k ${unit}/s`
  return `${(tokensPerSec / 1e6).toFixed(2)}M ${unit}/s`
}

/** Four significant digits; `nan` / `inf` spelt out. */
export const formatLoss = (loss: number): string => {
  if (Number.isNaN(loss)) return "nan"
  if (!Number.isFinite(loss)) return loss > 0 ? "inf" : "-inf"
  return Math.abs(loss) >= 1000 ? loss.toExponential(2) : loss.toPrecision(4)
}

/** `3.0e-4` style for learning rates. */
export const formatLr = (lr: number): string =>
  !Number.isFinite(lr) ? "--" : lr === 0 ? "0" : lr.toExponential(1).replace("e+", "e")

const BLOCKS = ["", "▏", "▎", "▍", "▌", "▋", "▊", "▉"]

/** A bar `width` cells wide for a fraction in [0, 1], with eighth-cell resolution. */
export const renderBar = (fraction: number, width: number): string => {
  const f = Number.isFinite(fraction) ? Math.min(1, Math.max(0, fraction)) : 0
  const w = Math.max(0, Math.floor(width))
  const eighths = Math.round(f * w * 8)
  const full = Math.floor(eighths / 8)
  const part = full < w ? BLOCKS[eighths % 8]! : ""
  return "█".repeat(full) + part + " ".repeat(w - full - (part === "" ? 0 : 1))
}

/** Exponential moving average of the time per step, from (step, time) observations. */
export interface StepTimer {
  /** Feed the step reached at time `nowMs`. */
  observe(step: number, nowMs: number): void
  /** Smoothed seconds per step, undefined until two observations with progress. */
  readonly secondsPerStep: number | undefined
  /** Seconds to reach `total`, undefined while unknown. */
  eta(total: number): number | undefined
}

export const makeStepTimer = (alpha = 0.1): StepTimer => {
  let last: { step: number; t: number } | undefined
  let current = 0
  let ema: number | undefined
  return {
    observe(step, nowMs) {
      current = Math.max(current, step)
      if (last === undefined) {
        last = { step, t: nowMs }
        return
      }
      const ds = step - last.step
      if (ds <= 0) return
      const perStep = (nowMs - last.t) / 1000 / ds
      // Weight by steps covered, so sparse updates count as much as frequent ones.
      const a = 1 - Math.pow(1 - alpha, ds)
      ema = ema === undefined ? perStep : a * perStep + (1 - a) * ema
      last = { step, t: nowMs }
    },
    get secondsPerStep() {
      return ema
    },
    eta(total) {
      return ema === undefined ? undefined : Math.max(0, total - current) * ema
    }
  }
}

export interface LineState {
  readonly label: string
  readonly step: number
  readonly total: number
  readonly loss: number
  readonly valLoss: number | undefined
  readonly tokensPerSec: number
  readonly lr: number | undefined
  readonly etaSeconds: number | undefined
  readonly elapsedSeconds: number
  readonly valAccuracy?: number | undefined
  readonly epoch?: { readonly done: number; readonly of: number } | undefined
  readonly unit?: "tok" | "samples" | undefined
}

const formatAcc = (a: number): string => `${(100 * a).toFixed(1)}%`

const statsOf = (s: LineState): Array<string> => [
  ...(s.epoch === undefined ? [] : [`epoch ${s.epoch.done}/${s.epoch.of}`]),
  `loss ${formatLoss(s.loss)}`,
  ...(s.valLoss === undefined ? [] : [`val ${formatLoss(s.valLoss)}`]),
  ...(s.valAccuracy === undefined ? [] : [`acc ${formatAcc(s.valAccuracy)}`]),
  formatRate(s.tokensPerSec, s.unit),
  ...(s.lr === undefined ? [] : [`lr ${formatLr(s.lr)}`])
]

const stepOf = (s: LineState): string => {
  const w = String(s.total).length
  return `${String(s.step).padStart(w)}/${s.total}`
}

/**
 * The TTY line, fitted to `columns`: fields matter more than the bar, so the bar shrinks and
 * goes first, then lr, tokens/s and val loss; step, loss and ETA stay (cut only as a last resort).
 */
export const formatTtyLine = (s: LineState, columns = 100): string => {
  const pct = s.total > 0 ? s.step / s.total : 0
  const head = `${s.label} ${String(Math.floor(pct * 100)).padStart(3)}%`
  const field = {
    loss: `${s.epoch === undefined ? "" : `epoch ${s.epoch.done}/${s.epoch.of} | `}loss ${formatLoss(s.loss)}`,
    val: s.valLoss === undefined ? undefined : `val ${formatLoss(s.valLoss)}${s.valAccuracy === undefined ? "" : ` acc ${formatAcc(s.valAccuracy)}`}`,
    rate: formatRate(s.tokensPerSec, s.unit),
    lr: s.lr === undefined ? undefined : `lr ${formatLr(s.lr)}`,
    eta: `ETA ${formatDuration(s.etaSeconds)}`
  }
  const drops: ReadonlyArray<ReadonlyArray<keyof typeof field>> = [[], ["lr"], ["lr", "rate"], ["lr", "rate", "val"]]
  let line = ""
  for (const drop of drops) {
    const kept = (["loss", "val", "rate", "lr", "eta"] as const).filter((k) => !drop.includes(k))
    const tail = [stepOf(s), ...kept.map((k) => field[k]).filter((f) => f !== undefined)].join(" | ")
    const room = columns - 1 - head.length - tail.length - 4
    if (room >= 10) return `${head} |${renderBar(pct, Math.min(40, room))}| ${tail}`
    line = `${head} ${tail}`
    if (line.length < columns) return line
  }
  return line.slice(0, Math.max(0, columns - 1))
}

/** The plain (non-TTY) line. */
export const formatPlainLine = (s: LineState): string => {
  const pct = s.total > 0 ? Math.floor((s.step / s.total) * 100) : 0
  return `${s.label} step ${stepOf(s)} (${pct}%) ${statsOf(s).join(" ")} elapsed ${
    formatDuration(s.elapsedSeconds)
  } eta ${formatDuration(s.etaSeconds)}`
}

/** Plain mode's decision: is a line due? (Pure, for tests.) */
export const plainLineDue = (o: {
  readonly step: number
  readonly total: number
  readonly lastStep: number | undefined
  readonly nowMs: number
  readonly lastMs: number | undefined
  readonly everyPercent: number
  readonly everySeconds: number
  readonly minGapSeconds: number
}): boolean => {
  if (o.lastStep === undefined || o.lastMs === undefined) return true
  if (o.step <= o.lastStep) return false
  const since = (o.nowMs - o.lastMs) / 1000
  if (since < o.minGapSeconds) return false
  if (since >= o.everySeconds) return true
  const bucket = (step: number): number =>
    o.total > 0 && o.everyPercent > 0 ? Math.floor((step / o.total) * 100 / o.everyPercent) : 0
  return bucket(o.step) > bucket(o.lastStep)
}

// ---------------------------------------------------------------------------------------------
// The reporter
// ---------------------------------------------------------------------------------------------

export const makeProgress = (options: ProgressOptions): Progress => {
  const stream = options.stream ?? process.stderr
  const tty = options.tty ?? stream.isTTY === true
  const now = options.now ?? Date.now
  const everyPercent = options.everyPercent ?? 10
  const everySeconds = options.everySeconds ?? 30
  const minGapSeconds = options.minGapSeconds ?? 2
  const redrawMs = options.redrawMs ?? 100
  const timer = makeStepTimer(options.alpha ?? 0.1)
  const start = now()
  let state: LineState | undefined
  let lastStep: number | undefined
  let lastMs: number | undefined
  let drawnMs: number | undefined
  let valLoss: number | undefined
  let valAccuracy: number | undefined
  let total = options.total
  let finished = false

  const draw = (final: boolean): void => {
    if (state === undefined) return
    if (tty) {
      stream.write(`\r${formatTtyLine(state, stream.columns ?? 100)}\x1b[K${final ? "\n" : ""}`)
    } else {
      stream.write(`${formatPlainLine(state)}${final ? " done" : ""}\n`)
    }
  }

  return {
    update(u) {
      if (finished) return
      const t = now()
      timer.observe(u.step, t)
      if (u.valLoss !== undefined) valLoss = u.valLoss
      if (u.valAccuracy !== undefined) valAccuracy = u.valAccuracy
      if (u.total !== undefined && u.total > 0) total = u.total
      state = {
        label: options.label,
        step: u.step,
        total,
        loss: u.loss,
        valLoss,
        valAccuracy,
        epoch: u.epoch,
        unit: u.unit,
        tokensPerSec: u.tokensPerSec,
        lr: u.lr,
        etaSeconds: timer.eta(total),
        elapsedSeconds: (t - start) / 1000
      }
      if (tty) {
        if (drawnMs === undefined || t - drawnMs >= redrawMs) {
          draw(false)
          drawnMs = t
        }
        return
      }
      if (plainLineDue({ step: u.step, total, lastStep, nowMs: t, lastMs, everyPercent, everySeconds, minGapSeconds })) {
        draw(false)
        lastStep = u.step
        lastMs = t
      }
    },
    done() {
      if (finished) return
      finished = true
      if (state === undefined) return
      state = { ...state, etaSeconds: 0, elapsedSeconds: (now() - start) / 1000 }
      if (!tty && lastStep === state.step) {
        // The status line for this step is already out: just close the run.
        stream.write(`${options.label} done in ${formatDuration(state.elapsedSeconds)}\n`)
      } else {
        draw(true)
      }
    }
  }
}
