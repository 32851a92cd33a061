/**
 * Implements: failpoints — named places where a fault drill can make this process die at an
 * exact moment that no outside signal can hit reliably (e.g. a worker between its pushes
 * to two parameter-server shards). `FLOTILLA_FAILPOINT="<name>[@<n>]"` arms one: the n-th
 * time (default the first) the process reaches `failpoint(name)`, it SIGKILLs itself. Unset,
 * a failpoint costs one comparison. Drills only (test/faults); never set it in a real job.
 * Points: `worker.between-pushes` (after the push to shard 0 reached the server, before the
 * push to shard 1).
 */
const spec = /^([a-z.-]+)(?:@(\d+))?$/.exec(process.env.FLOTILLA_FAILPOINT ?? "")
const armed = spec ? { name: spec[1], at: Number(spec[2] ?? 1) } : undefined
let hits = 0

/** Whether `name` is the armed failpoint (so a caller can make its state observable first, e.g. flush). */
export const isArmed = (name: string): boolean => armed?.name === name

/** Die here (SIGKILL, no clean-up: a crash) when this is the armed point's n-th hit. */
export const failpoint = (name: string): void => {
  if (armed?.name !== name || ++hits < armed.at) return
  process.stderr.write(`failpoint ${name}@${armed.at}: SIGKILL\n`)
  process.kill(process.pid, "SIGKILL")
}
