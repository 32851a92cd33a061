/**
 * Implements: the small field rules the optimizer and schedule validators share
 * (a predicate and the reason shown when it fails), and how a bad value is printed.
 */
export type Rule = readonly [ok: (v: unknown) => boolean, reason: string]

export const finite = (v: unknown): v is number => typeof v === "number" && Number.isFinite(v)
export const nonNegative: Rule = [(v) => finite(v) && v >= 0, "must be a finite number >= 0"]
export const positive: Rule = [(v) => finite(v) && v > 0, "must be a finite number > 0"]

/** A value as it appears in an error message. */
export const show = (v: unknown): string => {
  if (typeof v === "number") return String(v)
  try {
    return JSON.stringify(v) ?? String(v)
  } catch {
    return String(v)
  }
}
