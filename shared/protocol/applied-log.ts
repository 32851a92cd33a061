/**
 * Implements: the applied log — which train batches a parameter-server shard has applied,
 * in a bounded form: one bitmap per epoch (bit i = batch `e<epoch>-b<i>`), and a watermark
 * below which every epoch is complete (its bitmap is dropped). An epoch's size (batches per
 * epoch) travels with each gradient (GradMeta.epochBatches), so a full epoch is compacted.
 * Memory: ⌈batches/8⌉ bytes per open epoch, nothing per closed one.
 *
 * It is what makes "exactly once" survive restarts: the parameter server refuses a batch
 * already in its log and checkpoints the log; the loader's done set is the intersection
 * of every shard's log (`intersectLogs`), fetched with `GetAppliedLog`, never its memory.
 * JSON form (`AppliedLogJson`): `{ completeBelow, epochs: [{ epoch, batches, bits }] }`,
 * `bits` base64 of the bitmap, bit i at byte i>>3, mask 1<<(i&7).
 * Pure: no I/O, no clocks.
 */
import { Schema } from "effect"

export const AppliedLogJson = Schema.Struct({
  /** every batch of every epoch < completeBelow is applied. */
  completeBelow: Schema.Int.check(Schema.isGreaterThanOrEqualTo(0)),
  epochs: Schema.Array(
    Schema.Struct({
      epoch: Schema.Int.check(Schema.isGreaterThanOrEqualTo(0)),
      /** batches in this epoch (0 = not known yet: never compacted). */
      batches: Schema.Int.check(Schema.isGreaterThanOrEqualTo(0)),
      bits: Schema.String
    })
  )
})
export type AppliedLogJson = typeof AppliedLogJson.Type

export interface BatchRef {
  readonly epoch: number
  readonly index: number
}

const BATCH_ID = /^e(\d+)-b(\d+)$/

export const batchId = (epoch: number, index: number) => `e${epoch}-b${index}`

export const parseBatchId = (id: string): BatchRef | undefined => {
  const m = BATCH_ID.exec(id)
  return m ? { epoch: Number(m[1]), index: Number(m[2]) } : undefined
}

interface EpochBits {
  batches: number
  bits: Uint8Array
  count: number
}

const getBit = (b: Uint8Array, i: number) => (i >> 3) < b.length && (b[i >> 3] & (1 << (i & 7))) !== 0

export class AppliedLog {
  private completeBelow = 0
  private readonly epochs = new Map<number, EpochBits>()

  static fromJSON(j: AppliedLogJson): AppliedLog {
    const log = new AppliedLog()
    log.completeBelow = j.completeBelow
    for (const e of j.epochs) {
      const bits = new Uint8Array(Buffer.from(e.bits, "base64"))
      let count = 0
      for (let i = 0; i < bits.length * 8; i++) if (getBit(bits, i)) count++
      log.epochs.set(e.epoch, { batches: e.batches, bits, count })
    }
    log.compact()
    return log
  }

  toJSON(): AppliedLogJson {
    return {
      completeBelow: this.completeBelow,
      epochs: [...this.epochs].sort(([a], [b]) => a - b).map(([epoch, e]) => ({ epoch, batches: e.batches, bits: Buffer.from(e.bits).toString("base64") }))
    }
  }

  has(ref: BatchRef): boolean {
    if (ref.epoch < this.completeBelow) return true
    const e = this.epochs.get(ref.epoch)
    return e !== undefined && getBit(e.bits, ref.index)
  }

  hasId(id: string): boolean {
    const r = parseBatchId(id)
    return r !== undefined && this.has(r)
  }

  /** Record a batch; `batches` = the size of its epoch when known. false if already there. */
  add(ref: BatchRef, batches = 0): boolean {
    if (this.has(ref)) return false
    let e = this.epochs.get(ref.epoch)
    if (!e) this.epochs.set(ref.epoch, (e = { batches: 0, bits: new Uint8Array(Math.max(1, (Math.max(batches, ref.index + 1) + 7) >> 3)), count: 0 }))
    if (batches > 0) e.batches = batches
    if ((ref.index >> 3) >= e.bits.length) {
      const grown = new Uint8Array(Math.max((ref.index >> 3) + 1, e.bits.length * 2))
      grown.set(e.bits)
      e.bits = grown
    }
    e.bits[ref.index >> 3] |= 1 << (ref.index & 7)
    e.count++
    this.compact()
    return true
  }

  /** Batches of `epoch` applied so far (all of them below the watermark: returns -1 there). */
  countIn(epoch: number): number {
    if (epoch < this.completeBelow) return -1
    return this.epochs.get(epoch)?.count ?? 0
  }

  /** The lowest epoch that is not complete. */
  get openFrom(): number {
    return this.completeBelow
  }

  /** Bytes held (for the bounded-memory test and metrics). */
  get bytes(): number {
    let n = 0
    for (const e of this.epochs.values()) n += e.bits.length
    return n
  }

  get openEpochs(): number[] {
    return [...this.epochs.keys()].sort((a, b) => a - b)
  }

  private compact(): void {
    while (true) {
      const e = this.epochs.get(this.completeBelow)
      if (!e || e.batches === 0 || e.count < e.batches) return
      this.epochs.delete(this.completeBelow)
      this.completeBelow++
    }
  }
}

/** Batches applied on every one of `logs` (the loader's done set). */
export const intersectLogs = (logs: readonly AppliedLog[]): ((ref: BatchRef) => boolean) =>
  (ref) => logs.length > 0 && logs.every((l) => l.has(ref))
