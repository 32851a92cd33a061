// Implements: the receive budget of a reassembler (frames.ts) — what its incomplete
// messages may hold, charged IN FULL when a message's first frame is seen (its declared
// total, and the bookkeeping of its declared chunk count, which is at most
// 1 + ⌈total / MIN_CHUNK_BYTES⌉: a sender's chunk carries at least 1 KiB), not as bytes
// arrive, so a frame declaring 256 MiB in 2^28 chunks costs what it claims at once:
//  - per sender (the message id's first part, `senderOfMessageId`): at most
//    maxMessagesPerSender messages and maxBytesPerSender bytes;
//  - per pool: the known senders' (the members a receiver knows from heartbeats,
//    `isKnownSender`; default every sender) share maxOutstandingMessages / -Bytes, and every
//    other sender shares a smaller unknown pool (maxUnknownMessages / -Bytes).
// A sender is who the id claims: without NATS permissions anyone can claim any id, so a
// hostile client can fill the unknown pool and the quota of each member it impersonates,
// but never the memory of the members it does not.
// Does not own: reassembly (frames.ts), the limits of a job (shared/models/pipeline.ts bundleLimits).

/** The least data a sender's chunk carries (frameMessage refuses a maxPayload leaving less). */
export const MIN_CHUNK_BYTES = 1024
/** Bytes of bookkeeping per declared chunk (seen, offset, length, crc). */
const CHUNK_BOOKKEEPING = 1 + 8 + 8 + 4

/** The most chunks a message of `total` bytes can have. */
export const maxChunksFor = (total: number): number => 1 + Math.ceil(total / MIN_CHUNK_BYTES)

/** What a message of `total` bytes in `count` chunks is charged. */
export const costOf = (total: number, count: number): number => total + CHUNK_BOOKKEEPING * count

/**
 * The sender a message id names (`newMessageId`'s `<sender>-<process tag>-<counter>`), or
 * "?" for an id of another form. Claimed, not proven.
 */
export const senderOfMessageId = (id: string | undefined): string => {
  const m = id === undefined ? null : /^([A-Za-z0-9_-]{1,64})-[0-9a-f]{8}-[0-9a-z]{1,13}$/.exec(id)
  return m ? m[1] : "?"
}

export interface BudgetOptions {
  readonly maxMessageBytes: number
  readonly maxOutstandingBytes: number
  readonly maxOutstandingMessages: number
  /** Incomplete messages one sender may hold. Default maxOutstandingMessages (a job's receivers set it: bundleLimits). */
  readonly maxMessagesPerSender?: number
  /** Bytes one sender's incomplete messages may hold. Default maxOutstandingBytes. */
  readonly maxBytesPerSender?: number
  /** The senders of the known pool (default: every sender). */
  readonly isKnownSender?: (sender: string) => boolean
  /** The unknown senders' pool. Default 8 messages and maxMessageBytes. */
  readonly maxUnknownMessages?: number
  readonly maxUnknownBytes?: number
}

/** What one incomplete message is charged, and to whom. */
export interface Charge {
  readonly sender: string
  readonly known: boolean
  readonly cost: number
}

export type BudgetProblem = { readonly reason: "oversize" | "inconsistent-headers" | "over-budget"; readonly message: string }

interface Held {
  messages: number
  bytes: number
}

export class ReceiveBudget {
  readonly maxMessageBytes: number
  readonly maxMessagesPerSender: number
  readonly maxBytesPerSender: number
  readonly pools: { readonly known: Held & { readonly maxMessages: number; readonly maxBytes: number }; readonly unknown: Held & { readonly maxMessages: number; readonly maxBytes: number } }
  private readonly isKnown: (sender: string) => boolean
  private readonly bySender = new Map<string, Held>()

  constructor(o: BudgetOptions) {
    this.maxMessageBytes = o.maxMessageBytes
    this.maxMessagesPerSender = o.maxMessagesPerSender ?? o.maxOutstandingMessages
    this.maxBytesPerSender = o.maxBytesPerSender ?? o.maxOutstandingBytes
    this.isKnown = o.isKnownSender ?? (() => true)
    this.pools = {
      known: { messages: 0, bytes: 0, maxMessages: o.maxOutstandingMessages, maxBytes: o.maxOutstandingBytes },
      unknown: { messages: 0, bytes: 0, maxMessages: o.maxUnknownMessages ?? 8, maxBytes: o.maxUnknownBytes ?? o.maxMessageBytes }
    }
  }

  /** Every incomplete message's charge. */
  get bytes(): number {
    return this.pools.known.bytes + this.pools.unknown.bytes
  }

  /** What `sender` holds now. */
  heldBy(sender: string): { readonly messages: number; readonly bytes: number } {
    return this.bySender.get(sender) ?? { messages: 0, bytes: 0 }
  }

  /** Why message `id` of `total` bytes in `count` chunks cannot be taken now, or undefined. */
  problem(id: string, total: number, count: number): BudgetProblem | undefined {
    if (total > this.maxMessageBytes) return { reason: "oversize", message: `message ${id}: declared total ${total} bytes > limit ${this.maxMessageBytes}` }
    if (count > maxChunksFor(total)) {
      return { reason: "inconsistent-headers", message: `message ${id}: ${count} chunks for ${total} bytes (at most ${maxChunksFor(total)}: a chunk carries at least ${MIN_CHUNK_BYTES} bytes)` }
    }
    const cost = costOf(total, count)
    const sender = senderOfMessageId(id)
    const mine = this.heldBy(sender)
    if (mine.messages >= this.maxMessagesPerSender || mine.bytes + cost > this.maxBytesPerSender) {
      return { reason: "over-budget", message: `message ${id}: sender ${sender} holds ${mine.messages} messages / ${mine.bytes} bytes (its quota ${this.maxMessagesPerSender} / ${this.maxBytesPerSender}); this one would take ${cost}` }
    }
    const known = this.isKnown(sender)
    const pool = known ? this.pools.known : this.pools.unknown
    if (pool.messages >= pool.maxMessages || pool.bytes + cost > pool.maxBytes) {
      return { reason: "over-budget", message: `message ${id}: ${pool.messages} messages / ${pool.bytes} bytes already held for ${known ? "known" : "unknown"} senders (limits ${pool.maxMessages} / ${pool.maxBytes}); this one would take ${cost}` }
    }
    return undefined
  }

  /** Charge a message `problem` accepted. */
  charge(id: string, total: number, count: number): Charge {
    const sender = senderOfMessageId(id)
    const c: Charge = { sender, known: this.isKnown(sender), cost: costOf(total, count) }
    this.add(c, 1)
    return c
  }

  /** A message is complete, failed or timed out: what it held is free. */
  release(c: Charge): void {
    this.add(c, -1)
  }

  private add(c: Charge, sign: 1 | -1): void {
    const pool = c.known ? this.pools.known : this.pools.unknown
    pool.messages += sign
    pool.bytes += sign * c.cost
    const mine = this.bySender.get(c.sender) ?? { messages: 0, bytes: 0 }
    mine.messages += sign
    mine.bytes += sign * c.cost
    if (mine.messages <= 0) this.bySender.delete(c.sender)
    else this.bySender.set(c.sender, mine)
  }
}
