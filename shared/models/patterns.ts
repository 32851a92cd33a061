/**
 * Implements: name patterns over parameter names (`h.*.attn`, `wte`, `h.0`, `*.bias`) — what
 * `train.freeze`, `train.lora.targets`, `init.ignore` and `init.allowMissing` select.
 *
 * A pattern matches a name when it matches the whole name, or a whole prefix of it that ends
 * at a dot (so `h.0` selects every tensor of block 0, and `h.*.mlp` every MLP tensor). `*`
 * matches any run of characters, dots included; nothing else is special. Pure.
 */

const compile = (pattern: string): RegExp => {
  const body = pattern.split("*").map((s) => s.replace(/[.+?^${}()|[\]\\]/g, "\\$&")).join(".*")
  return new RegExp(`^${body}(?:\\..*)?$`)
}

const cache = new Map<string, RegExp>()

/** Does `name` match one of `patterns`? */
export const matchesAny = (name: string, patterns: readonly string[]): boolean =>
  patterns.some((p) => {
    let re = cache.get(p)
    if (re === undefined) cache.set(p, (re = compile(p)))
    return re.test(name)
  })

/** Patterns that match none of `names` (a typo in a job file should be said, not ignored). */
export const unmatched = (names: readonly string[], patterns: readonly string[]): string[] =>
  patterns.filter((p) => !names.some((n) => matchesAny(n, [p])))
