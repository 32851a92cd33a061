// Implements: the arithmetic the benches share — a median, and tokens/s per window of
// versions (or steps) after a warm-up. Owns nothing else; no I/O.

export const median = (xs: readonly number[]): number => {
  const s = [...xs].sort((a, b) => a - b)
  return s.length === 0 ? Number.NaN : s.length % 2 === 1 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2
}

/** tokens/s of each window of `window` steps after `warmup`: ends[i] = when step i ended (ms), tokens[i] its tokens. */
export const tokenWindows = (ends: readonly number[], tokens: readonly number[], warmup: number, window: number): number[] => {
  const out: number[] = []
  for (let i = warmup; i + window < ends.length; i += window) {
    let n = 0
    for (let j = i + 1; j <= i + window; j++) n += tokens[j]
    out.push((n / (ends[i + window] - ends[i])) * 1000)
  }
  return out
}
