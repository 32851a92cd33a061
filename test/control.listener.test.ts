// Checks: control events are applied once each, in the order accepted, though core NATS may
// lose or repeat them. The controller re-broadcasts its recent commands (`replayed`); the
// listener's cursor (shared/actor/control-listener.ts `advance`) fills a gap from the replay,
// ignores repeats, starts a late listener at the replay's newest command (it does not replay
// history to it), follows a restarted in-memory controller (new epoch), and gives up on a
// gap older than the replay window. Pure: no NATS, time passed in.
import { describe, expect, it } from "vitest"
import { advance, GAP_GIVE_UP_MS, type ControlCursor } from "../shared/actor/control-listener.ts"
import type { ControlApplied } from "../shared/protocol/control.ts"

const ev = (seq: number, verb: "pause" | "resume" | "stop", o: Partial<ControlApplied> = {}): ControlApplied => ({
  _tag: "ControlApplied", v: 1, job: "j", seq, verb, command: { _tag: verb === "pause" ? "PauseJob" : verb === "resume" ? "ResumeJob" : "StopJob", v: 1, job: "j", sender: "ctl", requestId: `r${seq}` } as never,
  sender: "ctl", requestId: `r${seq}`, by: "c", at: seq, epoch: 7, ...o
})

const run = (events: Array<[ControlApplied, number]>) => {
  let cursor: ControlCursor | undefined
  const applied: number[] = []
  for (const [e, now] of events) {
    const r = advance(cursor, e, now)
    cursor = r.cursor
    applied.push(...r.apply.map((x) => x.seq))
  }
  return applied
}

describe("control events: once each, in order", () => {
  it("a lost command is applied from the replay, before the one that followed it", () => {
    // pause #1 seen, resume #2 lost, pause #3 seen, then the replay of 1..3
    const replay = (seq: number, verb: "pause" | "resume") => ev(seq, verb, { replayed: true, latest: 3 })
    expect(run([[ev(1, "pause"), 0], [ev(3, "pause"), 10], [replay(1, "pause"), 2000], [replay(2, "resume"), 2000], [replay(3, "pause"), 2000]])).toEqual([1, 2, 3])
  })

  it("ignores repeats", () => {
    expect(run([[ev(1, "pause"), 0], [ev(1, "pause"), 1], [ev(2, "resume"), 2], [ev(1, "pause", { replayed: true, latest: 2 }), 2000], [ev(2, "resume", { replayed: true, latest: 2 }), 2000]])).toEqual([1, 2])
  })

  it("a listener that starts mid-job does not replay the history before it", () => {
    expect(run([[ev(4, "pause", { replayed: true, latest: 5 }), 0], [ev(5, "resume", { replayed: true, latest: 5 }), 0], [ev(6, "stop"), 10]])).toEqual([6])
  })

  it("follows a restarted in-memory controller (a new epoch counts from 1 again)", () => {
    expect(run([[ev(1, "pause"), 0], [ev(2, "resume"), 1], [ev(1, "stop", { epoch: 99 }), 2]])).toEqual([1, 2, 1])
  })

  it("goes on without commands older than the replay window", () => {
    expect(run([[ev(1, "pause"), 0], [ev(5, "resume"), 10], [ev(6, "stop"), 20]])).toEqual([1])
    expect(run([[ev(1, "pause"), 0], [ev(5, "resume"), 10], [ev(6, "stop"), 10 + GAP_GIVE_UP_MS]])).toEqual([1, 5, 6])
  })
})
