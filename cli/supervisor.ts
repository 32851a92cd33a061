/**
 * Implements: supervision of `flotilla up`'s child processes, the way torchrun's elastic
 * agent or an Akka supervisor does it. A child that dies (a non-zero exit or a signal)
 * before the job is over is restarted after an exponential backoff (250 ms doubling to
 * 8 s; back to 250 ms once a child has stayed up 30 s), within a restart budget per child
 * (10 restarts within 5 min by default). One more death spends the budget: the
 * supervisor gives up, naming the child, its exits and its last log lines. A child that
 * exits 0 is done and stays down (a worker at the final version; every actor after
 * `flotilla ctl <job> stop`).
 *
 * The policy is the pure reducer `step(state, event) -> [state, effects]` (no processes,
 * no clocks: every event carries its time), tested in test/supervisor.test.ts. `supervise`
 * is its shell: child exits, restart timers and the stop request only enqueue into ONE
 * queue; ONE fiber takes them off, runs the reducer and performs its effects (spawn, log,
 * timer, give up).
 * Does not own: what a child is (cli/up.ts builds its command line from cli/topology.ts).
 */
import type { ChildProcess } from "node:child_process"
import { Clock, Deferred, Effect, Queue, Scope } from "effect"

// ---------------------------------------------------------------- the policy (pure)

export interface RestartPolicy {
  /** restarts allowed per child within `windowMs`; a death past them spends the budget (0: never restart). */
  readonly maxRestarts: number
  readonly windowMs: number
  /** wait before the first restart; doubles with each restart, up to `backoffMaxMs`. */
  readonly backoffMs: number
  readonly backoffMaxMs: number
  /** a child that stayed up this long before dying restarts after `backoffMs` again. */
  readonly resetAfterMs: number
}

export const DEFAULT_RESTART_POLICY: RestartPolicy = {
  maxRestarts: 10,
  windowMs: 5 * 60_000,
  backoffMs: 250,
  backoffMaxMs: 8_000,
  resetAfterMs: 30_000
}

/** How a child process ended. */
export interface ChildExit {
  readonly code: number | null
  readonly signal: string | null
  /** when it ended, and how long it had been up (ms). */
  readonly at: number
  readonly upMs: number
}

export type ChildStatus =
  | "running"
  /** dead, waiting out its backoff before the restart. */
  | "backoff"
  /** exited 0: its work is done, or it was told to stop. */
  | "done"
  /** died after the supervisor stopped restarting (shutting down). */
  | "stopped"
  /** its restart budget is spent. */
  | "failed"

export interface ChildState {
  readonly id: string
  readonly status: ChildStatus
  readonly startedAt: number
  /** restarts so far: the next spawn's $FLOTILLA_RESTARTS. */
  readonly restarts: number
  /** when each restart within the current window was decided. */
  readonly recent: readonly number[]
  /** the wait before the next restart. */
  readonly backoffMs: number
  /** the last few exits, newest last (bounded). */
  readonly exits: readonly ChildExit[]
}

export interface SupervisorState {
  readonly policy: RestartPolicy
  /** no more restarts: the job is over, or shutting down. */
  readonly holding: boolean
  readonly children: ReadonlyMap<string, ChildState>
  /** whether AllDone went out. */
  readonly allDone: boolean
}

export type SupervisorEvent =
  | { readonly _tag: "ChildExited"; readonly id: string; readonly code: number | null; readonly signal: string | null; readonly at: number }
  | { readonly _tag: "RestartDue"; readonly id: string; readonly at: number }
  /** the job is over (or `ctl stop`, or shutdown): children that die from now on stay down. */
  | { readonly _tag: "HoldRestarts"; readonly at: number }

export type SupervisorEffect =
  | { readonly _tag: "Spawn"; readonly id: string; readonly restarts: number }
  | { readonly _tag: "StartTimer"; readonly id: string; readonly delayMs: number }
  | { readonly _tag: "Log"; readonly line: string }
  | { readonly _tag: "GiveUp"; readonly id: string; readonly reason: string }
  /** HoldRestarts is in force: nothing will be spawned any more. */
  | { readonly _tag: "Holding" }
  /** no child is running or waiting for a restart, and none failed: every one exited 0. */
  | { readonly _tag: "AllDone" }

const MAX_EXITS_KEPT = 5

export const exitText = (e: { code: number | null; signal: string | null }): string =>
  e.signal ? e.signal : `code ${e.code ?? "?"}`

const duration = (ms: number): string =>
  ms < 1_000
    ? `${Math.round(ms)} ms`
    : ms < 60_000
      ? `${(ms / 1000).toFixed(ms < 10_000 ? 1 : 0)} s`
      : `${(ms / 60_000).toFixed(ms % 60_000 === 0 ? 0 : 1)} min`

/** The supervisor's first state, with every child spawned at `now` (restarts 0). */
export const init = (policy: RestartPolicy, ids: readonly string[], now: number): [SupervisorState, SupervisorEffect[]] => {
  const children = new Map<string, ChildState>()
  for (const id of ids) children.set(id, { id, status: "running", startedAt: now, restarts: 0, recent: [], backoffMs: policy.backoffMs, exits: [] })
  return [{ policy, holding: false, children, allDone: false }, ids.map((id) => ({ _tag: "Spawn", id, restarts: 0 }))]
}

const withChild = (st: SupervisorState, c: ChildState): SupervisorState => {
  const children = new Map(st.children)
  children.set(c.id, c)
  return { ...st, children }
}

/** AllDone once no child is running or in backoff and none failed. */
const settle = (st: SupervisorState, effects: SupervisorEffect[]): [SupervisorState, SupervisorEffect[]] => {
  if (st.allDone) return [st, effects]
  const all = [...st.children.values()]
  if (all.length > 0 && all.every((c) => c.status === "done" || c.status === "stopped")) {
    return [{ ...st, allDone: true }, [...effects, { _tag: "AllDone" }]]
  }
  return [st, effects]
}

/** The policy: what to do about one event. Pure. */
export const step = (st: SupervisorState, ev: SupervisorEvent): [SupervisorState, SupervisorEffect[]] => {
  const p = st.policy
  switch (ev._tag) {
    case "HoldRestarts": {
      if (st.holding) return [st, [{ _tag: "Holding" }]]
      const children = new Map<string, ChildState>()
      for (const c of st.children.values()) children.set(c.id, c.status === "backoff" ? { ...c, status: "stopped" } : c)
      return settle({ ...st, holding: true, children }, [{ _tag: "Holding" }])
    }
    case "RestartDue": {
      const c = st.children.get(ev.id)
      if (!c || c.status !== "backoff" || st.holding) return [st, []]
      return [withChild(st, { ...c, status: "running", startedAt: ev.at }), [{ _tag: "Spawn", id: c.id, restarts: c.restarts }]]
    }
    case "ChildExited": {
      const c = st.children.get(ev.id)
      if (!c || c.status !== "running") return [st, []]
      const exit: ChildExit = { code: ev.code, signal: ev.signal, at: ev.at, upMs: Math.max(0, ev.at - c.startedAt) }
      const exits = [...c.exits, exit].slice(-MAX_EXITS_KEPT)
      if (ev.code === 0 && ev.signal === null) return settle(withChild(st, { ...c, status: "done", exits }), [])
      if (st.holding) return settle(withChild(st, { ...c, status: "stopped", exits }), [])
      const recent = c.recent.filter((t) => ev.at - t < p.windowMs)
      if (recent.length >= p.maxRestarts) {
        const died = recent.length + 1
        const reason =
          p.maxRestarts === 0
            ? `${c.id} exited (${exitText(ev)}) after ${duration(exit.upMs)}, and restarts are off (--max-restarts 0)`
            : `${c.id} died ${died} times within ${duration(p.windowMs)}: its restart budget (${p.maxRestarts} restarts per ${duration(p.windowMs)}) is spent; ` +
              `its last exits: ${exits.map((e) => `${exitText(e)} after ${duration(e.upMs)}`).join(", ")}`
        return [withChild(st, { ...c, status: "failed", exits, recent }), [{ _tag: "GiveUp", id: c.id, reason }]]
      }
      // a child that stayed up long enough starts its backoff over
      const delayMs = exit.upMs >= p.resetAfterMs ? p.backoffMs : c.backoffMs
      const next: ChildState = {
        ...c,
        status: "backoff",
        exits,
        restarts: c.restarts + 1,
        recent: [...recent, ev.at],
        backoffMs: Math.min(p.backoffMaxMs, delayMs * 2)
      }
      const line = `flotilla up: restarting ${c.id} (exited ${exitText(ev)}), restart ${recent.length + 1}/${p.maxRestarts} in ${duration(delayMs)}`
      return [withChild(st, next), [{ _tag: "Log", line }, { _tag: "StartTimer", id: c.id, delayMs }]]
    }
  }
}

// ---------------------------------------------------------------- the shell

export class SupervisorGaveUp extends Error {
  readonly _tag = "SupervisorGaveUp"
  readonly id: string
  constructor(id: string, message: string) {
    super(message)
    this.id = id
  }
}

export interface SuperviseOptions {
  /** the children, in spawn order. */
  readonly ids: readonly string[]
  readonly policy: RestartPolicy
  /** start child `id`; `restarts` is how many times it was restarted before (0 the first time). */
  readonly spawn: (id: string, restarts: number) => ChildProcess
  readonly log: (line: string) => void
  /** the child's last log lines, for the message when its budget is spent. */
  readonly tail: (id: string) => readonly string[]
  /** how long a child may take to exit after SIGTERM at shutdown before SIGKILL (default 15 s). */
  readonly graceMs?: number
}

export interface SupervisorHandle {
  /** fails when a child's restart budget is spent (the message names it, its exits and its last lines). */
  readonly failed: Deferred.Deferred<never, SupervisorGaveUp>
  /** completes when no child is running or waiting for a restart and every one exited 0 (e.g. `ctl stop`). */
  readonly allDone: Deferred.Deferred<void>
  /** no more restarts from now on (the job is over, or stopping); children that exit stay down. */
  readonly holdRestarts: Effect.Effect<void>
  /** the current state (read-only; for messages and tests). */
  readonly state: () => SupervisorState
  /** the live process of a child, if it is running. */
  readonly process: (id: string) => ChildProcess | undefined
}

const terminate = (procs: readonly ChildProcess[], graceMs: number) =>
  Effect.promise(() =>
    Promise.all(
      procs.map(
        (p) =>
          new Promise<void>((res) => {
            if (p.exitCode !== null || p.signalCode !== null) return res()
            const t = setTimeout(() => p.kill("SIGKILL"), graceMs)
            p.once("exit", () => {
              clearTimeout(t)
              res()
            })
            p.kill("SIGTERM")
          })
      )
    )
  )

/**
 * Spawn every child and keep them running until the scope closes; then hold restarts,
 * SIGTERM every live child (SIGKILL after `graceMs`) and wait for them to exit.
 */
export const supervise = (o: SuperviseOptions): Effect.Effect<SupervisorHandle, never, Scope.Scope> =>
  Effect.gen(function* () {
    const events = yield* Queue.unbounded<SupervisorEvent>()
    const failed = yield* Deferred.make<never, SupervisorGaveUp>()
    const allDone = yield* Deferred.make<void>()
    const holding = yield* Deferred.make<void>()
    // touched by the loop fiber only (the shutdown finalizer reads it once `holding` is done)
    const live = new Map<string, ChildProcess>()
    let state: SupervisorState

    const start = (id: string, restarts: number) =>
      Effect.sync(() => {
        const proc = o.spawn(id, restarts)
        live.set(id, proc)
        let reported = false
        const report = (code: number | null, signal: string | null) => {
          if (reported) return
          reported = true
          Queue.offerUnsafe(events, { _tag: "ChildExited", id, code, signal, at: Date.now() })
        }
        proc.once("exit", (code, signal) => report(code, signal))
        // a process that could not start at all (ENOENT, EMFILE) gets no "exit"
        proc.once("error", (e) => {
          o.log(`flotilla up: ${id}: ${e.message}`)
          if (proc.pid === undefined) report(null, null)
        })
      })

    const perform = (e: SupervisorEffect): Effect.Effect<void> => {
      switch (e._tag) {
        case "Spawn":
          return start(e.id, e.restarts)
        case "StartTimer":
          return Effect.forkChild(
            Effect.sleep(e.delayMs).pipe(
              Effect.andThen(Clock.currentTimeMillis),
              Effect.flatMap((at) => Queue.offer(events, { _tag: "RestartDue", id: e.id, at }))
            )
          ).pipe(Effect.asVoid)
        case "Log":
          return Effect.sync(() => o.log(e.line))
        case "GiveUp": {
          const tail = o.tail(e.id).slice(-15)
          const msg = `${e.reason}${tail.length > 0 ? `\nthe last lines of ${e.id}:\n  ${tail.join("\n  ")}` : ""}`
          return Deferred.fail(failed, new SupervisorGaveUp(e.id, msg)).pipe(Effect.asVoid)
        }
        case "Holding":
          return Deferred.succeed(holding, undefined).pipe(Effect.asVoid)
        case "AllDone":
          return Deferred.succeed(allDone, undefined).pipe(Effect.asVoid)
      }
    }
    const run = (effects: readonly SupervisorEffect[]) => Effect.forEach(effects, perform, { discard: true })

    const [s0, first] = init(o.policy, o.ids, yield* Clock.currentTimeMillis)
    state = s0
    yield* run(first)

    // the mailbox: one fiber, one queue
    yield* Effect.forkScoped(
      Effect.forever(
        Effect.gen(function* () {
          const ev = yield* Queue.take(events)
          if (ev._tag === "ChildExited") live.delete(ev.id)
          const [next, effects] = step(state, ev)
          state = next
          yield* run(effects)
        })
      )
    )

    // at scope close (before the loop fiber is interrupted): hold restarts, then stop every live child
    yield* Effect.addFinalizer(() =>
      Effect.gen(function* () {
        yield* Queue.offer(events, { _tag: "HoldRestarts", at: yield* Clock.currentTimeMillis })
        yield* Deferred.await(holding)
        yield* terminate([...live.values()], o.graceMs ?? 15_000)
      })
    )

    return {
      failed,
      allDone,
      holdRestarts: Clock.currentTimeMillis.pipe(
        Effect.flatMap((at) => Queue.offer(events, { _tag: "HoldRestarts", at })),
        Effect.andThen(Deferred.await(holding))
      ),
      state: () => state,
      process: (id) => live.get(id)
    } satisfies SupervisorHandle
  })
