// Checks: the evaluator's reducer (actors/worker/eval-core.ts). It evaluates each due
// version (multiples of evalEvery, and the last) once every shard is at it, once per params
// identity — so after a server restart the recomputed version is evaluated again — waits
// for its validation batches, pulls a shard whose heartbeat shows params it lacks, and
// pulls every shard when nothing arrived for QUIET_MS. Pure: events in, effects out.
import { describe, expect, it } from "vitest"
import { evalStep, initialEval, QUIET_MS, type EvalEffect, type EvalEvent } from "../actors/worker/eval-core.ts"

const params = (shard: number, incarnation: number, version: number): EvalEvent => ({ _tag: "ParamsReceived", shard, incarnation, version, params: new Map([[`w${shard}`, Float32Array.of(version)]]), source: "pull" })
const evaluated = (fx: EvalEffect[]) => fx.filter((e) => e._tag === "Evaluate").map((e) => (e as Extract<EvalEffect, { _tag: "Evaluate" }>).version)

describe("evaluator reducer", () => {
  it("evaluates each due version once, when every shard is at it and the batches are in", () => {
    const s = initialEval({ shards: 2, steps: 30, every: 10, epochs: 0 }, 0)
    expect(evaluated(evalStep(s, params(0, 1, 0)))).toEqual([])
    expect(evaluated(evalStep(s, params(1, 2, 0)))).toEqual([]) // no validation batches yet
    expect(evaluated(evalStep(s, { _tag: "ValReady" }))).toEqual([0])
    expect(evaluated(evalStep(s, params(0, 1, 10)))).toEqual([]) // shard 1 still at 0
    const both = evalStep(s, params(1, 2, 10))
    expect(evaluated(both)).toEqual([10])
    const e = both.find((x) => x._tag === "Evaluate") as Extract<EvalEffect, { _tag: "Evaluate" }>
    expect([...e.params.keys()].sort()).toEqual(["w0", "w1"])
    expect(evaluated(evalStep(s, params(0, 1, 10)))).toEqual([]) // not newer: ignored
    evalStep(s, params(0, 1, 11))
    expect(evaluated(evalStep(s, params(1, 2, 11)))).toEqual([]) // not due
  })

  it("evaluates a version again after a restart recomputed it; finishes at the last", () => {
    const s = initialEval({ shards: 1, steps: 20, every: 10, epochs: 0 }, 0)
    evalStep(s, { _tag: "ValReady" })
    expect(evaluated(evalStep(s, params(0, 1, 10)))).toEqual([10])
    expect(evaluated(evalStep(s, params(0, 1, 12)))).toEqual([])
    // the server restarted from its checkpoint at 10 (a newer incarnation, a lower version)
    expect(evaluated(evalStep(s, params(0, 5, 10)))).toEqual([10])
    const end = evalStep(s, params(0, 5, 20))
    expect(end.map((x) => x._tag)).toEqual(["Evaluate", "Finish"])
    expect(evalStep(s, params(0, 5, 21))).toEqual([])
  })

  it("evalEvery epoch: evaluates the first params after each epoch completes, and finishes at the last epoch", () => {
    const s = initialEval({ shards: 2, steps: Number.MAX_SAFE_INTEGER, every: "epoch", epochs: 2 }, 0)
    const at = (shard: number, version: number, epochsDone: number): EvalEvent => ({ ...params(shard, shard + 1, version), epochsDone }) as EvalEvent
    evalStep(s, { _tag: "ValReady" })
    for (const v of [1, 2, 3]) {
      evalStep(s, at(0, v, 0))
      expect(evaluated(evalStep(s, at(1, v, 0))), `version ${v}: epoch 0 still open`).toEqual([])
    }
    evalStep(s, at(0, 4, 1))
    expect(evaluated(evalStep(s, at(1, 4, 0))), "shard 1's log not complete yet").toEqual([])
    evalStep(s, at(0, 5, 1))
    const first = evalStep(s, at(1, 5, 1))
    expect(evaluated(first)).toEqual([5])
    expect(first.find((e) => e._tag === "Evaluate")).toMatchObject({ epochsDone: 1 })
    evalStep(s, at(0, 6, 1))
    expect(evaluated(evalStep(s, at(1, 6, 1))), "once per epoch").toEqual([])
    evalStep(s, at(0, 9, 2))
    expect(evalStep(s, at(1, 9, 2)).map((e) => e._tag)).toEqual(["Evaluate", "Finish"])
  })

  it("pulls what a heartbeat says it lacks, and everything after QUIET_MS of silence", () => {
    const s = initialEval({ shards: 2, steps: 100, every: 10, epochs: 0 }, 0)
    evalStep(s, params(0, 1, 3))
    expect(evalStep(s, { _tag: "ServerSeen", shard: 0, incarnation: 1, version: 3 })).toEqual([])
    expect(evalStep(s, { _tag: "ServerSeen", shard: 0, incarnation: 1, version: 4 })).toMatchObject([{ _tag: "Pull", shard: 0 }])
    expect(evalStep(s, { _tag: "ServerSeen", shard: 1, incarnation: 2, version: 0 })).toMatchObject([{ _tag: "Pull", shard: 1 }])
    expect(evalStep(s, { _tag: "ServerSeen", shard: 1, incarnation: 2, version: 0 })).toEqual([]) // one pull at a time per shard
    expect(evalStep(s, { _tag: "Tick", now: QUIET_MS - 1 })).toEqual([])
    expect(evalStep(s, { _tag: "Tick", now: QUIET_MS })).toMatchObject([{ _tag: "Pull", shard: 0 }, { _tag: "Pull", shard: 1 }])
  })
})
