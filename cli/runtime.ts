/**
 * Implements: running an actor program as a process — logging, signals, exit codes.
 *
 * SIGINT/SIGTERM interrupt the program, so every scope closes: subscriptions drain, a
 * `leaving` heartbeat goes out, parameter servers checkpoint. A second signal exits at
 * once. Log level: FLOTILLA_LOG (debug|info|warn|error), else the command's default.
 * A process `flotilla up` started (FLOTILLA_SUPERVISOR_PID, its pid) stops the same clean way
 * when `up` is gone (killed with SIGKILL, say): no actor outlives its supervisor.
 */
import { Cause, Effect, Exit, Fiber, Layer, Logger, References } from "effect"
import type { LogLevel } from "effect/LogLevel"

const LEVELS: Record<string, LogLevel> = { debug: "Debug", info: "Info", warn: "Warn", warning: "Warn", error: "Error" }

export const logLevelFromEnv = (fallback: LogLevel): LogLevel =>
  LEVELS[(process.env.FLOTILLA_LOG ?? "").toLowerCase()] ?? fallback

/** One line per entry on stderr: time, level, message (stdout stays for results). */
const lineLogger = Logger.make((o) => {
  const t = new Date().toISOString().slice(11, 23)
  const msg = Array.isArray(o.message) ? o.message.map((m) => (typeof m === "string" ? m : Cause.isCause(m) ? Cause.pretty(m) : JSON.stringify(m))).join(" ") : String(o.message)
  const cause = o.cause && o.cause.reasons.length > 0 ? `\n${Cause.pretty(o.cause)}` : ""
  process.stderr.write(`${t} ${o.logLevel.toUpperCase().padEnd(5)} ${msg}${cause}\n`)
})

export const loggingLayer = (level: LogLevel) =>
  Layer.mergeAll(Logger.layer([lineLogger]), Layer.succeed(References.MinimumLogLevel, level))

/** Run `program` as the process's main: exit 0 on success, 1 on failure, 130 on signal. */
export const runMain = <E>(program: Effect.Effect<void, E>, level: LogLevel = "Info"): void => {
  const fiber = Effect.runFork(program.pipe(Effect.provide(loggingLayer(logLevelFromEnv(level)))))
  let signals = 0
  const onSignal = (sig: string) => {
    signals++
    if (signals > 1) process.exit(130)
    process.stderr.write(`\n${sig}: stopping cleanly (again to force)\n`)
    Effect.runFork(Fiber.interrupt(fiber))
  }
  process.on("SIGINT", () => onSignal("SIGINT"))
  process.on("SIGTERM", () => onSignal("SIGTERM"))
  const supervisor = Number(process.env.FLOTILLA_SUPERVISOR_PID)
  if (Number.isInteger(supervisor) && supervisor > 1) {
    // a child of `flotilla up`: once up is gone (this process re-parented), stop as on SIGTERM
    const watch = setInterval(() => {
      if (process.ppid === supervisor) return
      clearInterval(watch)
      onSignal(`flotilla up (pid ${supervisor}) is gone`)
    }, 1_000)
    watch.unref()
  }
  fiber.addObserver((exit) => {
    if (Exit.isSuccess(exit)) process.exit(0)
    if (Cause.hasInterruptsOnly(exit.cause)) process.exit(signals > 0 ? 0 : 130)
    const errs = Cause.prettyErrors(exit.cause)
    process.stderr.write(`flotilla: ${errs.map((e) => e.message).join("\n") || Cause.pretty(exit.cause)}\n`)
    process.exit(1)
  })
}
