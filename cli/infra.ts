/**
 * Implements: `flotilla infra` — what an operator needs to put a job on a shared,
 * secured nats-server (docs/SECURITY.md):
 *
 *   flotilla infra account <job> [--out DIR] [--shards K] [--force] [--env-refs]
 *       DIR/account.conf  the job's account block, one nkey user per role (public keys only):
 *                         include it inside the server config's `accounts { }`
 *       DIR/<role>.nk     each role's nkey seed, mode 0600 (`flotilla launch … --nkey FILE`)
 *       DIR/nkeys.env     FLOTILLA_<JOB>_<ROLE>_NKEY=U… for configs that name the keys as
 *                         variables (infra/nats/nats.conf, the Kubernetes ConfigMap)
 *   flotilla infra routes [--out FILE] [--force]
 *       FILE              FLOTILLA_ROUTE_PASSWORD and FLOTILLA_ROUTE_<i> (the route URLs with it),
 *                         mode 0600, for the cluster configs of infra/nats/cluster/
 *
 * Keys are made with nkeys.js (the ed25519 nkeys library nats.js ships with and exports as
 * `nkeys`): a user seed `SU…`, its public key `U…`. The permissions are
 * shared/bus/permissions.ts's. Existing seeds are kept unless --force (a rotation).
 * Does not own: the permissions, presenting a seed (shared/bus/nats.ts).
 */
import { randomBytes } from "node:crypto"
import { chmodSync, existsSync, mkdirSync, writeFileSync } from "node:fs"
import { dirname, join } from "node:path"
import { nkeys } from "nats"
import { loadJobFile } from "../shared/config/job.ts"
import { accountBlock, accountName, checkJobName, jobRoles, nkeyEnvVar, ROLE_PURPOSE, type JobRole } from "../shared/bus/permissions.ts"

export class InfraUsageError extends Error {
  readonly _tag = "InfraUsageError"
}

export interface InfraOptions {
  readonly command: string
  readonly args: ReadonlyArray<string>
  readonly out?: string
  readonly shards?: string
  readonly jobFile?: string
  readonly force?: boolean
  readonly envRefs?: boolean
  /** where the report goes (default stdout). */
  readonly write?: (text: string) => void
}

export interface WrittenAccount {
  readonly dir: string
  readonly account: string
  readonly seeds: ReadonlyMap<JobRole, string>
  readonly publicKeys: ReadonlyMap<JobRole, string>
}

const secretFile = (file: string, text: string) => {
  writeFileSync(file, text, { mode: 0o600 })
  chmodSync(file, 0o600) // an existing file keeps its mode otherwise
}

const shardsOf = (o: InfraOptions): number => {
  if (o.shards !== undefined) {
    const k = Number(o.shards)
    if (!Number.isInteger(k) || k < 1 || k > 1024) throw new InfraUsageError(`--shards must be an integer in [1, 1024], got ${JSON.stringify(o.shards)}`)
    return k
  }
  return o.jobFile !== undefined ? loadJobFile(o.jobFile).topology.psShards : 1
}

/** The account block of `job` with its keys named as variables (infra/nats/nats.conf's form). */
export const envRefAccount = (job: string, shards: number): string =>
  accountBlock(job, jobRoles(shards).map((role) => ({ role, auth: { kind: "nkey" as const, nkey: `$${nkeyEnvVar(job, role)}` } })))

/** Write job `job`'s account and every role's seed into `dir`; existing seeds are reused unless `force`. */
export const writeAccount = (job: string, shards: number, dir: string, force = false): WrittenAccount => {
  checkJobName(job)
  mkdirSync(dir, { recursive: true, mode: 0o700 })
  const roles = jobRoles(shards)
  const seeds = new Map<JobRole, string>()
  const publicKeys = new Map<JobRole, string>()
  const existing = roles.map((role) => join(dir, `${role}.nk`)).find((f) => existsSync(f))
  if (existing !== undefined && !force) throw new InfraUsageError(`${existing} exists: pass --force to replace every seed in ${dir} (a key rotation), or choose another --out`)
  for (const role of roles) {
    const file = join(dir, `${role}.nk`)
    const kp = nkeys.createUser()
    const seed = new TextDecoder().decode(kp.getSeed() as Uint8Array)
    secretFile(file, `${seed}\n`)
    seeds.set(role, file)
    publicKeys.set(role, kp.getPublicKey() as string)
  }
  const account = join(dir, "account.conf")
  writeFileSync(
    account,
    `# job ${job}: written by \`flotilla infra account ${job} --shards ${shards}\`. No secrets here (public keys only).\n` +
      `# Include it inside the server config's accounts block:  accounts { include ./${job}/account.conf }\n` +
      accountBlock(job, roles.map((role) => ({ role, auth: { kind: "nkey" as const, nkey: publicKeys.get(role)! } })))
  )
  writeFileSync(join(dir, "nkeys.env"), roles.map((role) => `${nkeyEnvVar(job, role)}=${publicKeys.get(role)}`).join("\n") + "\n")
  return { dir, account, seeds, publicKeys }
}

/** The route credentials of a cluster: one random password (hex: safe in a URL) and each node's route URL with it. */
export const routeEnv = (hosts: ReadonlyArray<string>, password = randomBytes(24).toString("hex")): string =>
  [`FLOTILLA_ROUTE_PASSWORD=${password}`, ...hosts.map((h, i) => `FLOTILLA_ROUTE_${i + 1}=nats-route://route:${password}@${h}:6222`)].join("\n") + "\n"

export const infraMain = (o: InfraOptions): void => {
  const write = o.write ?? ((t: string) => void process.stdout.write(t))
  switch (o.command) {
    case "account": {
      const [job, ...extra] = o.args
      if (job === undefined) throw new InfraUsageError("usage: flotilla infra account <job> [--out DIR] [--shards K]")
      if (extra.length > 0) throw new InfraUsageError(`infra account takes one job, got ${[job, ...extra].join(" ")}`)
      try {
        checkJobName(job)
      } catch (e) {
        throw new InfraUsageError((e as Error).message)
      }
      const shards = shardsOf(o)
      if (o.envRefs) return write(envRefAccount(job, shards))
      const dir = o.out ?? join("nats-accounts", job)
      const r = writeAccount(job, shards, dir, o.force)
      const rows = [...r.seeds].map(([role, file]) => `  ${file.padEnd(dir.length + 16)} ${role.startsWith("ps-") ? ROLE_PURPOSE["ps-k"].replace(/\bk\b/g, role.slice(3)) : ROLE_PURPOSE[role]}`)
      write(
        [
          `account ${accountName(job)} of job ${job} (${shards} parameter-server shard${shards === 1 ? "" : "s"}): ${dir}`,
          `  ${r.account.padEnd(dir.length + 16)} the account (public keys): inside the server's accounts { }, then reload it (nats-server --signal reload)`,
          `  ${join(dir, "nkeys.env").padEnd(dir.length + 16)} the same keys as ${nkeyEnvVar(job, "worker").replace("_WORKER_", "_<ROLE>_")}=… variables`,
          ...rows,
          "",
          "Give each role its seed file only (mode 0600; a Kubernetes Secret, a compose secret):",
          `  flotilla launch worker --job JOB.yaml --nats nats://HOST:4222 --nkey ${join(dir, "worker.nk")}`,
          `  flotilla up JOB.yaml --nats nats://HOST:4222 --account ${dir}        (every process as its role)`,
          `  flotilla ctl ${job} status --nats nats://HOST:4222 --nkey ${join(dir, "observer.nk")}`,
          ""
        ].join("\n")
      )
      return
    }
    case "routes": {
      if (o.args.length > 0) throw new InfraUsageError(`infra routes takes no arguments, got ${o.args.join(" ")}`)
      const file = o.out ?? join("nats-accounts", "routes.env")
      if (existsSync(file) && !o.force) throw new InfraUsageError(`${file} exists: pass --force to make a new route password (restart every node)`)
      mkdirSync(dirname(file), { recursive: true, mode: 0o700 })
      secretFile(file, routeEnv(["nats-1", "nats-2", "nats-3"]))
      write(`route credentials for nats-1, nats-2, nats-3: ${file} (mode 0600); give it to every node's environment (infra/nats/cluster/README.md)\n`)
      return
    }
    default:
      throw new InfraUsageError(`unknown infra command ${JSON.stringify(o.command)}: account | routes`)
  }
}
