// Checks: the reassembler's limits (shared/wire/budget.ts, frames.ts) hold against a
// hostile sender. A declared total and chunk count are charged in full at the first frame
// (not as bytes arrive), and a chunk count no sender can produce (more than 1 + ⌈total /
// 1 KiB⌉) is refused before anything is allocated; each sender (the message id's first
// part) has its own quota of messages and bytes, so one that floods fills only its own;
// unknown senders share a small pool, so a flood under many made-up names leaves the
// members' memory alone; a repeated chunk does not keep a message alive past its timeout;
// a claim (transport.ts) is answered by the same budget; and a job's limits come from its
// model (shared/models/pipeline.ts bundleLimits), not a fixed 256 MiB.
// Run: npx vitest run test/wire.limits.test.ts
import { describe, expect, it } from "vitest"
import { Result } from "effect"
import { costOf, maxChunksFor, senderOfMessageId } from "../shared/wire/budget.ts"
import { frameMessage, H, newMessageId, Reassembler } from "../shared/wire/frames.ts"
import type { AcceptResult, Frame } from "../shared/wire/frames.ts"
import { bundleLimits } from "../shared/models/pipeline.ts"
import { makeModel } from "../shared/models/zoo.ts"
import { resolveJob } from "../shared/config/job.ts"

const MAX = 64 * 1024 // small maxPayload: several frames per message
const bytes = (n: number) => Uint8Array.from({ length: n }, (_, i) => (i * 131 + 7) & 0xff)
const framesOf = (id: string, n: number): Frame[] => Result.getOrThrow(frameMessage(bytes(n), { id, maxPayload: MAX }))
const tag = (r: AcceptResult) => (r._tag === "Rejected" ? `Rejected:${r.error.reason}` : r._tag)
const first = (r: Reassembler, f: Frame[]) => tag(r.accept(f[0].headers, f[0].data, 0))
/** One frame that only declares: `total` bytes in `count` chunks, carrying 1 KiB. */
const declaring = (id: string, total: number, count: number): Frame => {
  const [f] = framesOf(id, 1024)
  return { headers: { ...f.headers, [H.total]: String(total), [H.chunks]: String(count), [H.crc]: "00000000" }, data: f.data }
}

describe("receive budget", () => {
  it("names a message's sender by its id's first part", () => {
    expect(senderOfMessageId(newMessageId("worker-1"))).toBe("worker-1")
    expect(senderOfMessageId(newMessageId("ps-0"))).toBe("ps-0")
    expect(senderOfMessageId("made-up")).toBe("?")
    expect(senderOfMessageId(undefined)).toBe("?")
  })

  it("charges a declared total and chunk count in full at the first frame, and refuses a count no sender makes", () => {
    const r = new Reassembler({ maxMessageBytes: 64 * 2 ** 20, maxOutstandingBytes: 256 * 2 ** 20 })
    expect(tag(r.accept(declaring(newMessageId("w0"), 10 * 2 ** 20, 200).headers, declaring("x", 1, 1).data, 0))).toBe("Pending")
    expect(r.outstandingBytes).toBe(costOf(10 * 2 ** 20, 200)) // 1 KiB arrived, 10 MiB + bookkeeping charged
    // 2^26 chunks for 64 MiB would be 1.4 GB of bookkeeping: refused, nothing charged
    const huge = declaring(newMessageId("w1"), 64 * 2 ** 20, 2 ** 26)
    const rejected = r.accept(huge.headers, huge.data, 0)
    expect(tag(rejected)).toBe("Rejected:inconsistent-headers")
    expect(rejected._tag === "Rejected" && rejected.error.message).toMatch(new RegExp(`at most ${maxChunksFor(64 * 2 ** 20)}`))
    expect(r.outstandingBytes).toBe(costOf(10 * 2 ** 20, 200))
    expect(r.outstandingMessages).toBe(1)
  })

  it("gives each sender its own quota: one that floods is refused, the others are not", () => {
    const r = new Reassembler({ maxMessageBytes: 2 ** 20, maxOutstandingBytes: 8 * 2 ** 20, maxMessagesPerSender: 3, maxBytesPerSender: 1.5 * 2 ** 20 })
    const flood = Array.from({ length: 6 }, () => framesOf(newMessageId("hostile"), 200_000))
    expect(flood.map((f) => first(r, f))).toEqual(["Pending", "Pending", "Pending", "Rejected:over-budget", "Rejected:over-budget", "Rejected:over-budget"])
    expect(r.budget.heldBy("hostile").messages).toBe(3)
    // bytes too: a sender under its message count but over its bytes
    const big = framesOf(newMessageId("w0"), 900_000)
    expect(first(r, big)).toBe("Pending")
    expect(first(r, framesOf(newMessageId("w0"), 900_000))).toBe("Rejected:over-budget")
    const honest = framesOf(newMessageId("w1"), 200_000)
    expect(honest.map((f) => tag(r.accept(f.headers, f.data, 1))).at(-1)).toBe("Complete")
    // a complete message frees its sender's quota
    expect(r.budget.heldBy("w1").messages).toBe(0)
  })

  it("puts unknown senders in a small shared pool: a flood under made-up names leaves the members' room", () => {
    const members = new Set(["w0", "w1"])
    const r = new Reassembler({
      maxMessageBytes: 2 ** 20, maxOutstandingBytes: 4 * 2 ** 20, maxOutstandingMessages: 8, maxMessagesPerSender: 2,
      isKnownSender: (s) => members.has(s), maxUnknownMessages: 4, maxUnknownBytes: 2 ** 20
    })
    const names = Array.from({ length: 40 }, (_, i) => framesOf(newMessageId(`fake${i}`), 100_000))
    const got = names.map((f) => first(r, f))
    expect(got.filter((t) => t === "Pending").length).toBe(4)
    expect(got.filter((t) => t === "Rejected:over-budget").length).toBe(36)
    expect(r.budget.pools.unknown.bytes).toBeLessThanOrEqual(2 ** 20)
    for (const w of ["w0", "w1"]) {
      const f = framesOf(newMessageId(w), 600_000)
      expect(f.map((x) => tag(r.accept(x.headers, x.data, 1))).at(-1), w).toBe("Complete")
    }
    // what timed out is free again
    expect(r.sweep(60_000).length).toBe(4)
    expect(r.budget.pools.unknown).toMatchObject({ messages: 0, bytes: 0 })
  })

  it("a repeated chunk is not progress: the message still times out", () => {
    const r = new Reassembler({ timeoutMs: 1000 })
    const f = framesOf(newMessageId("w0"), 300_000)
    expect(tag(r.accept(f[0].headers, f[0].data, 0))).toBe("Pending")
    expect(tag(r.accept(f[0].headers, f[0].data, 900))).toBe("Rejected:duplicate-chunk")
    expect(r.sweep(1000).map((e) => e.reason)).toEqual(["timeout"])
  })

  it("answers a claim with the same budget", () => {
    const r = new Reassembler({ maxMessageBytes: 2 ** 20, maxOutstandingBytes: 4 * 2 ** 20, maxMessagesPerSender: 1 })
    expect(r.budgetProblem(newMessageId("w0"), 3 * 2 ** 20, 10)?.reason).toBe("oversize")
    expect(r.budgetProblem(newMessageId("w0"), 1000, 1e9)?.reason).toBe("inconsistent-headers")
    expect(first(r, framesOf(newMessageId("w0"), 200_000))).toBe("Pending")
    expect(r.budgetProblem(newMessageId("w0"), 1000, 1)?.message).toMatch(/sender w0 holds 1 messages/)
    expect(r.budgetProblem(newMessageId("w1"), 1000, 1)).toBeUndefined()
  })
})

describe("a job's bundle limits come from its model", () => {
  it("sizes messages by the largest shard (or activation), not a fixed 256 MiB", () => {
    const tiny = resolveJob({ model: { kind: "gpt", vocabSize: 256, contextLength: 16, layers: 1, heads: 2, width: 16 }, topology: { workers: 2, psShards: 2 } }, "tiny")
    const big = resolveJob({ model: { kind: "gpt", vocabSize: 256, contextLength: 64, layers: 4, heads: 4, width: 256 }, topology: { workers: 2, psShards: 1 } }, "big")
    const [lt, lb] = [bundleLimits(tiny, makeModel(tiny.model)), bundleLimits(big, makeModel(big.model))]
    const bytesOf = (j: typeof tiny) => makeModel(j.model).specs.reduce((n, s) => n + 4 * s.shape.reduce((a, b) => a * b, 1), 0)
    expect(lt.maxMessageBytes).toBeLessThan(2 * bytesOf(tiny) + 2 ** 20 + 1)
    expect(lt.maxMessageBytes).toBeLessThan(2 * 2 ** 20)
    expect(lb.maxMessageBytes).toBe(2 * bytesOf(big) + 2 ** 20)
    expect(lt.maxUnknownBytes).toBe(2 * lt.maxMessageBytes)
    expect(lt.maxOutstandingBytes).toBe(2 * (2 + 2 + 2) * lt.maxMessageBytes)
  })
})
