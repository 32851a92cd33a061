/**
 * Implements: the parameter server's protocol module — typed constructors for every message
 * a shard sends (PushAck, GradientsHeld, StepDecided, NormShare, StepApplied, AppliedLog,
 * the params bundle) and `ParamServerClient`, the small client other actors use to talk
 * to a shard (`pull`, `appliedLog`, `decision`), so nobody builds these messages by hand.
 * Schemas live in shared/protocol/messages.ts; subjects in shared/protocol/subjects.ts.
 */
import { Effect, Result } from "effect"
import type { BusShape } from "../../shared/bus/Bus.ts"
import { AppliedLog as AppliedLogBits } from "../../shared/protocol/applied-log.ts"
import { decodeBytes, encodeMessage } from "../../shared/protocol/decode.ts"
import {
  AppliedLog,
  ParamsMeta,
  Rejected,
  StepDecided,
  type GradientsHeld,
  type NormShare,
  type PushAck,
  type StepApplied
} from "../../shared/protocol/messages.ts"
import { decodeValue } from "../../shared/protocol/decode.ts"
import { PROTOCOL_VERSION, type Subjects } from "../../shared/protocol/subjects.ts"
import type { TensorBundle } from "../../shared/wire/tensor.ts"
import { requestBundle } from "../../shared/wire/transport.ts"
import { DEFAULT_COMPRESSION, gradCodecAt, paramsTensors } from "../../shared/wire/compression.ts"
import type { AppliedStep, GradientPush, Held } from "./aggregate.ts"
import type { PsState } from "./core.ts"

const v = PROTOCOL_VERSION

export const pushAck = (s: PsState, p: GradientPush, status: PushAck["status"]): PushAck => ({
  _tag: "PushAck", v, shard: s.cfg.shard, incarnation: s.incarnation, sender: p.sender, batchId: p.batchId, version: p.version, status
})

export const gradientsHeld = (s: PsState): GradientsHeld => ({
  _tag: "GradientsHeld", v, shard: s.cfg.shard, incarnation: s.incarnation, version: s.core.version,
  held: s.core.heldList().map((h) => ({ sender: h.sender, batchId: h.batchId }))
})

export const stepDecided = (s: PsState, version: number, pushes: readonly Held[], lr: number): StepDecided => ({
  _tag: "StepDecided", v, shard: s.cfg.shard, incarnation: s.incarnation, version, lr,
  chosen: pushes.map((p) => ({ sender: p.sender, batchId: p.batchId }))
})

export const normShare = (s: PsState, version: number, sumSq: number, echo = false): NormShare => ({
  _tag: "NormShare", v, shard: s.cfg.shard, incarnation: s.incarnation, version, sumSq, ...(echo ? { echo: true } : {})
})

export const stepApplied = (s: PsState, step: AppliedStep, final: boolean, epoch: number): StepApplied => ({
  _tag: "StepApplied", v, shard: s.cfg.shard, incarnation: s.incarnation, version: step.version, batchIds: step.batchIds,
  contributors: step.contributors, samples: step.samples, tokens: step.tokens, loss: step.loss, lr: step.lr,
  gradNorm: Number.isFinite(step.gradNorm) ? step.gradNorm : -1, maxStaleness: step.maxStaleness, aggregateMs: 0, at: 0, final,
  epoch,
  epochsDone: s.core.log.openFrom,
  ...(s.epochBatches > 0 ? { epochBatches: s.epochBatches } : {})
})

export const appliedLog = (s: PsState): AppliedLog => ({
  _tag: "AppliedLog", v, shard: s.cfg.shard, incarnation: s.incarnation, version: s.core.version, log: s.core.log.toJSON()
})

/** The params of this shard as a bundle (views of the live arrays: send before the next update). */
export const paramsBundle = (s: PsState): TensorBundle => ({
  // f32 views of the live arrays, or (train.compression.params: bf16) bf16 copies of the big ones
  tensors: paramsTensors(s.cfg.compression ?? DEFAULT_COMPRESSION, s.core.specs, s.core.params),
  meta: {
    kind: "params", job: s.cfg.job, version: s.core.version, step: s.core.version, sender: s.cfg.id, codec: s.cfg.compression?.params ?? "f32",
    // the codec of the gradients computed on this version: every sender follows it, so a switch happens at one version
    extra: { shard: s.cfg.shard, incarnation: s.incarnation, epochsDone: s.core.log.openFrom, codec: gradCodecAt(s.cfg.compression ?? DEFAULT_COMPRESSION, s.codecSwitches, s.core.version), run: s.run } satisfies ParamsMeta
  }
})

/** A params bundle's shard and incarnation, or why it is not one. */
export const paramsMeta = (b: TensorBundle): Result.Result<ParamsMeta, string> => {
  if (b.meta.kind !== "params") return Result.fail(`expected a params bundle, got ${b.meta.kind}`)
  const r = decodeValue(ParamsMeta, "params meta", b.meta.extra ?? {})
  return Result.isFailure(r) ? Result.fail(r.failure.reason) : Result.succeed(r.success)
}

/** What an update waits for, in words (logged when nothing moved for a while). */
export const describeWait = (s: PsState): string => {
  const held = s.core.heldList().map((h) => `${h.sender}:${h.batchId}@v${h.version}`).join(" ") || "none"
  const reports = [...s.heldBy.values()].map((r) => `shard ${r.shard} v${r.version} holds [${r.held.map((x) => `${x.sender}:${x.batchId}`).join(" ")}]`).join("; ")
  return `version ${s.core.version}, phase ${s.phase._tag}${s.paused ? " (paused)" : ""}, held ${held}, barrier [${[...s.barrier].sort()}], members [${[...s.members].sort()}]` +
    (s.core.consistency.mode === "sync" && s.cfg.shards > 1 ? `, decision ${s.decisions.has(s.core.version + 1) ? "known" : "not yet"}${s.cfg.shard === 0 ? `, reports: ${reports || "none"}` : ""}` : "")
}

export interface PulledParams {
  readonly shard: number
  readonly incarnation: number
  readonly version: number
  readonly bundle: TensorBundle
}

export const ParamServerClient = {
  /** Shard k's current params (a new incarnation may be below `minVersion`: the caller decides). */
  pull: (bus: BusShape, s: Subjects, shard: number, from: string, minVersion = 0, timeoutMs = 10_000, limits: { maxMessageBytes?: number; maxOutstandingBytes?: number } = {}) =>
    requestBundle(bus, s.psPull(shard), encodeMessage({ _tag: "PullParams", v, worker: from, minVersion }), { timeoutMs, ...limits }).pipe(
      Effect.flatMap(({ bundle }) => {
        const m = paramsMeta(bundle)
        return Result.isFailure(m)
          ? Effect.fail(new Error(`pull of shard ${shard}: ${m.failure}`))
          : Effect.succeed<PulledParams>({ shard, incarnation: m.success.incarnation, version: bundle.meta.version, bundle })
      })
    ),

  /** Shard k's applied log. */
  appliedLog: (bus: BusShape, s: Subjects, shard: number, from: string, timeoutMs = 2_000) =>
    bus.request(s.psLog(shard), encodeMessage({ _tag: "GetAppliedLog", v, from }), { timeoutMs }).pipe(
      Effect.flatMap((m) => Effect.fromResult(decodeBytes(AppliedLog, m.subject, m.data))),
      Effect.map((a) => ({ ...a, bits: AppliedLogBits.fromJSON(a.log) }))
    ),

  /** Shard 0's decision for `version` (a follower that missed the StepDecided). */
  decision: (bus: BusShape, s: Subjects, version: number, timeoutMs = 2_000) =>
    bus.request(s.psDecision, encodeMessage({ _tag: "GetDecision", v, version }), { timeoutMs }).pipe(
      Effect.flatMap((m) => {
        const d = decodeBytes(StepDecided, m.subject, m.data)
        if (Result.isSuccess(d)) return Effect.succeed(d.success)
        const r = decodeBytes(Rejected, m.subject, m.data)
        return Effect.fail(new Error(Result.isSuccess(r) ? r.success.reason : d.failure.message))
      })
    )
}
