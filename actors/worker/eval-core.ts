/**
 * Implements: the evaluator's mailbox reducer (the worker in `mode: "eval"`): which params
 * to evaluate, as a pure function `evalStep(state, event) → effects`. It keeps the newest
 * params of each shard (the same acceptance rule as a training worker: a newer version of
 * one incarnation, or any version of a newer incarnation), and asks for an evaluation of
 * every version that is due (a multiple of evalEvery, or with evalEvery "epoch" the first
 * version after each epoch completes; and the final one) once every shard is
 * at it — each params identity once, so a server that restarts and recomputes a version
 * gets it evaluated again. A heartbeat showing params it lacks, or QUIET_MS without any,
 * makes it pull. Which params are believed is params-cache.ts's rule (the worker's): the
 * last version is evaluated, and ends the evaluator, only once its servers confirmed it.
 * The shell (worker.ts) leases the validation batches, computes the losses and publishes
 * them. No I/O, no clocks.
 */
import { emptyCache, finalState, pullShard, serverSeen, takeParams, type ParamsCache, type ParamsIn } from "./params-cache.ts"

export interface EvalConfig {
  readonly shards: number
  readonly steps: number
  /** evaluate every N versions, or once per epoch (when shard 0's params show one more complete epoch). */
  readonly every: number | "epoch"
  /** the job also ends at this many complete epochs (0 = no limit). */
  readonly epochs: number
}

/** No params for this long: pull every shard (a lost broadcast, a restarted server). */
export const QUIET_MS = 5_000

export interface EvalState extends ParamsCache {
  readonly cfg: EvalConfig
  /** complete epochs of the last evaluation (-1: none yet). */
  lastEpoch: number
  /** the validation batches are leased: evaluations can run. */
  ready: boolean
  lastKey: string
  quietSince: number
  now: number
  done: boolean
}

export type EvalEvent =
  | ({ readonly _tag: "ParamsReceived" } & ParamsIn)
  | { readonly _tag: "PullEnded"; readonly shard: number }
  | { readonly _tag: "ServerSeen"; readonly shard: number; readonly incarnation: number; readonly version: number; readonly id?: string }
  | { readonly _tag: "ValReady" }
  | { readonly _tag: "Tick"; readonly now: number }

const EVAL_TAGS: ReadonlySet<string> = new Set(["ParamsReceived", "PullEnded", "ServerSeen", "ValReady", "Tick"])
/** The evaluator's events among what the worker's mailbox carries. */
export const isEvalEvent = (e: { readonly _tag: string }): e is EvalEvent => EVAL_TAGS.has(e._tag)

export type EvalEffect =
  | { readonly _tag: "Pull"; readonly shard: number; readonly minVersion?: number }
  | { readonly _tag: "Evaluate"; readonly version: number; readonly epochsDone: number; readonly params: ReadonlyMap<string, Float32Array> }
  | { readonly _tag: "Finish" }
  /** a params bundle not believed (params-cache.ts): reported on `errors`, naming its sender. */
  | { readonly _tag: "RefuseParams"; readonly shard: number; readonly version: number; readonly sender?: string; readonly messageId?: string; readonly reason: string }

export const initialEval = (cfg: EvalConfig, now: number): EvalState => ({ cfg, ...emptyCache(), stats: { pulls: 0 }, lastEpoch: -1, ready: false, lastKey: "", quietSince: now, now, done: false })

export const evalStep = (s: EvalState, e: EvalEvent): EvalEffect[] => {
  const out: EvalEffect[] = []
  if (s.done) return out
  switch (e._tag) {
    case "ParamsReceived": {
      const got = takeParams(s, e, s.now, (x) => out.push(x))
      if (got === "newer" || got === "restarted") s.quietSince = s.now
      break
    }
    case "PullEnded":
      s.pulling.delete(e.shard)
      break
    case "ServerSeen": {
      const p = serverSeen(s, e, s.now)
      if (p) out.push(p)
      break
    }
    case "ValReady":
      s.ready = true
      break
    case "Tick":
      s.now = e.now
      if (s.now - s.quietSince >= QUIET_MS) {
        s.quietSince = s.now
        s.pulling.clear() // nothing came back for QUIET_MS: a pull that never ended is given up
        for (let k = 0; k < s.cfg.shards; k++) out.push(pullShard(s, k)!)
      }
      break
  }
  if (!s.ready || s.cache.size < s.cfg.shards) return out
  const cached = [...s.cache.values()]
  const v = cached[0].version
  const key = cached.map((x) => `${x.incarnation}:${x.version}`).join("/")
  const epochs = Math.min(...cached.map((x) => x.epochsDone ?? 0))
  // the last version counts once its servers confirmed it (else those shards are pulled)
  const final = v >= s.cfg.steps ? finalState(s, Array.from({ length: s.cfg.shards }, (_, k) => k), s.cfg.steps) : undefined
  if (final && !final.done) {
    out.push(...final.pulls)
    return out
  }
  const last = v >= s.cfg.steps || (s.cfg.epochs > 0 && epochs >= s.cfg.epochs)
  const due = s.cfg.every === "epoch" ? epochs > s.lastEpoch && epochs > 0 : v % s.cfg.every === 0
  if (!cached.every((x) => x.version === v) || key === s.lastKey || !(due || last)) return out
  s.lastKey = key
  s.lastEpoch = Math.max(s.lastEpoch, epochs)
  const params = new Map<string, Float32Array>()
  for (const x of cached) for (const [k, t] of x.params) params.set(k, t)
  out.push({ _tag: "Evaluate", version: v, epochsDone: epochs, params })
  if (last) {
    s.done = true
    out.push({ _tag: "Finish" })
  }
  return out
}
