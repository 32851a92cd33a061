// Implements: NATS subject syntax for the buses — validation of publish subjects and
// subscription patterns, and matching a subject against a pattern with `*` (exactly one
// token) and `>` (one or more trailing tokens).
// Does not own: building Flotilla's subjects (the subjects module does that), transport.
//
// Rules (the same as nats-server's, so code that works in-process works on NATS):
//   - tokens are separated by "."; no empty tokens, no whitespace or control characters;
//   - a publish subject holds no wildcard token;
//   - in a pattern `*` and `>` are whole tokens, `>` only as the last one.

/** Why `subject` is not a valid publish subject, or undefined when it is. */
export const publishSubjectProblem = (subject: string): string | undefined =>
  tokensProblem(subject, false)

/** Why `pattern` is not a valid subscription subject, or undefined when it is. */
export const subscribeSubjectProblem = (pattern: string): string | undefined =>
  tokensProblem(pattern, true)

/** True when the (valid) publish subject is matched by the (valid) pattern. */
export const subjectMatches = (pattern: string, subject: string): boolean => {
  if (pattern === subject) return true
  const p = pattern.split(".")
  const s = subject.split(".")
  for (let i = 0; i < p.length; i++) {
    const t = p[i]
    if (t === ">") return s.length > i
    if (i >= s.length) return false
    if (t !== "*" && t !== s[i]) return false
  }
  return p.length === s.length
}

const tokensProblem = (subject: string, wildcardsAllowed: boolean): string | undefined => {
  if (subject.length === 0) return "empty subject"
  let tokenStart = 0
  for (let i = 0; i <= subject.length; i++) {
    const c = i < subject.length ? subject.charCodeAt(i) : 46 /* "." ends the last token */
    if (c === 46) {
      const len = i - tokenStart
      if (len === 0) return "empty token (leading, trailing or double '.')"
      if (len === 1) {
        const t = subject.charCodeAt(tokenStart)
        if (t === 42 /* * */ || t === 62 /* > */) {
          if (!wildcardsAllowed) return "wildcards are not allowed in a publish subject"
          if (t === 62 && i !== subject.length) return "'>' must be the last token"
        }
      }
      tokenStart = i + 1
    } else if (c <= 32 || c === 127) {
      return "whitespace or control character in subject"
    }
  }
  return undefined
}
