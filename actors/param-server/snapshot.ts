/**
 * Implements: the undo buffer of one parameter-server step — a copy of what an optimizer
 * step changes (the trained params and their optimizer slots, and which slots exist), taken
 * just before the step into buffers kept from one step to the next (no allocation in the
 * steady state), and put back when the step's result is not finite (aggregate.ts), so a
 * step is all or nothing. A slot the step replaces by reference (`byRef`, the delay
 * compensation's last raw gradient) is kept by reference, not copied.
 * Cost (measured, bench note in docs/RELIABILITY.md): one copy of params + slots per step,
 * plus the finite scan of the new params.
 * Does not own: the step (aggregate.ts), deciding what to do with a refused step (core.ts).
 */
import type { OptimizerSlots } from "../../shared/optim/optimizers.ts"

interface Saved {
  param: Float32Array
  readonly slots: Map<string, Float32Array>
  /** the slot names the tensor had before the step. */
  had: string[]
  ref: Float32Array | undefined
}

const sized = (buf: Float32Array | undefined, n: number): Float32Array => (buf !== undefined && buf.length === n ? buf : new Float32Array(n))

export class StepSnapshot {
  private readonly saved = new Map<string, Saved>()
  /** the slot kept by reference. */
  readonly byRef: string

  constructor(byRef: string) {
    this.byRef = byRef
  }

  /** Copy `names`' params and slots (before a step). */
  save(names: readonly string[], params: ReadonlyMap<string, Float32Array>, slots: ReadonlyMap<string, OptimizerSlots>): void {
    for (const name of names) {
      const p = params.get(name)!
      const sl = slots.get(name)!
      const b = this.saved.get(name) ?? { param: new Float32Array(0), slots: new Map(), had: [], ref: undefined }
      b.param = sized(b.param, p.length)
      b.param.set(p)
      b.had = Object.keys(sl)
      b.ref = sl[this.byRef]
      for (const k of b.had) {
        if (k === this.byRef) continue
        const buf = sized(b.slots.get(k), sl[k].length)
        buf.set(sl[k])
        b.slots.set(k, buf)
      }
      this.saved.set(name, b)
    }
  }

  /** Put back what `save` copied: the params and slots as they were before the step. */
  restore(names: readonly string[], params: ReadonlyMap<string, Float32Array>, slots: ReadonlyMap<string, OptimizerSlots>): void {
    for (const name of names) {
      const b = this.saved.get(name)
      if (b === undefined) continue
      params.get(name)!.set(b.param)
      const sl = slots.get(name)!
      for (const k of Object.keys(sl)) if (!b.had.includes(k)) delete sl[k]
      for (const k of b.had) {
        if (k === this.byRef) continue
        const buf = b.slots.get(k)!
        if (sl[k]?.length === buf.length) sl[k].set(buf)
        else sl[k] = Float32Array.from(buf)
      }
      if (b.ref === undefined) delete sl[this.byRef]
      else sl[this.byRef] = b.ref
    }
  }
}
