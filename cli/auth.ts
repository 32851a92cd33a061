/**
 * Implements: NATS credentials on the command line, the way the NATS tools take them —
 * the options (`--creds FILE`, `--nkey FILE`, `--user` / `--password`, `--token`,
 * `--tls-ca FILE`, `--tls-cert FILE`, `--tls-key FILE`), their environment variables
 * (NATS_CREDS, NATS_NKEY, NATS_USER, NATS_PASSWORD, NATS_TOKEN, NATS_CA, NATS_CERT,
 * NATS_KEY), flags over the environment, and the environment that hands a credential to a
 * child process (`authEnv`; `flotilla up` gives each actor its own that way, so no secret
 * shows in `ps`).
 *
 *   const auth = authFromArgs(values)        // undefined: connect anonymously
 *   NatsBus.layer({ servers, auth })
 *
 * One way to authenticate at a time: a second one given is a usage error, not a guess.
 * A credential given by a flag replaces every credential of the environment (so a stale
 * NATS_CREDS cannot leak into a `--user` run); `--user` with NATS_PASSWORD set takes that
 * password (keep it off the command line). Files are read and checked here, so a bad one
 * is an error naming the file before anything connects.
 * Does not own: connecting (shared/bus/nats.ts), which role may do what (shared/bus/permissions.ts).
 */
import type { ParseArgsConfig } from "node:util"
import { natsConnectAuth, type NatsAuth } from "../shared/bus/nats.ts"

export class AuthUsageError extends Error {
  readonly _tag = "AuthUsageError"
}

/** The parseArgs options every NATS command takes. */
export const AUTH_OPTIONS = {
  creds: { type: "string" },
  nkey: { type: "string" },
  user: { type: "string" },
  password: { type: "string" },
  token: { type: "string" },
  "tls-ca": { type: "string" },
  "tls-cert": { type: "string" },
  "tls-key": { type: "string" }
} as const satisfies ParseArgsConfig["options"]

/** Every environment variable a credential can come from. */
export const AUTH_ENV = ["NATS_CREDS", "NATS_NKEY", "NATS_USER", "NATS_PASSWORD", "NATS_TOKEN", "NATS_CA", "NATS_CERT", "NATS_KEY"] as const

export const AUTH_HELP = `credentials (a flag wins over its environment variable; docs/SECURITY.md):
  --creds FILE       NATS credentials file: user JWT + seed, as nsc writes it   $NATS_CREDS
  --nkey FILE        nkey seed file (flotilla infra account writes one per role) $NATS_NKEY
  --user U           user name, with --password P (or $NATS_PASSWORD)           $NATS_USER
  --password P       its password                                                $NATS_PASSWORD
  --token T          an authorization token                                      $NATS_TOKEN
  --tls-ca FILE      trust the server's certificate to this CA (PEM)            $NATS_CA
  --tls-cert FILE    client certificate for mutual TLS, with --tls-key FILE     $NATS_CERT, $NATS_KEY
`

const nonEmpty = (x: unknown): string | undefined => (typeof x === "string" && x !== "" ? x : undefined)

type Kind = "creds" | "nkey" | "user" | "token"
const FLAG_OF: Record<Kind, string> = { creds: "--creds", nkey: "--nkey", user: "--user/--password", token: "--token" }
const ENV_OF: Record<Kind, string> = { creds: "NATS_CREDS", nkey: "NATS_NKEY", user: "NATS_USER/NATS_PASSWORD", token: "NATS_TOKEN" }

/**
 * The credentials parsed options and the environment say, or undefined when none is
 * given (an anonymous connection, which a secured server refuses). Throws AuthUsageError.
 */
export const authFromArgs = (v: Record<string, unknown>, env: NodeJS.ProcessEnv = process.env): NatsAuth | undefined => {
  const flag = {
    creds: nonEmpty(v.creds), nkey: nonEmpty(v.nkey), user: nonEmpty(v.user), password: typeof v.password === "string" ? v.password : undefined, token: nonEmpty(v.token)
  }
  const fromEnv = {
    creds: nonEmpty(env.NATS_CREDS), nkey: nonEmpty(env.NATS_NKEY), user: nonEmpty(env.NATS_USER), password: env.NATS_PASSWORD, token: nonEmpty(env.NATS_TOKEN)
  }
  const kinds = (x: typeof flag): Kind[] =>
    (["creds", "nkey", "user", "token"] as const).filter((k) => (k === "user" ? x.user !== undefined || x.password !== undefined : x[k] !== undefined))
  const flagKinds = kinds(flag)
  const envKinds = kinds(fromEnv)
  if (flagKinds.length > 1) throw new AuthUsageError(`give one way to authenticate, not ${flagKinds.map((k) => FLAG_OF[k]).join(" and ")}`)
  // --password alone with NATS_USER set is still one user/password credential
  const fromFlags = flagKinds.length === 1
  if (!fromFlags && envKinds.length > 1) {
    throw new AuthUsageError(`the environment holds more than one credential (${envKinds.map((k) => ENV_OF[k]).join(", ")}): unset all but one, or give one with a flag`)
  }
  const kind: Kind | undefined = fromFlags ? flagKinds[0] : envKinds[0]
  const auth: { creds?: string; nkey?: string; user?: string; password?: string; token?: string; tls?: NatsAuth["tls"] } = {}
  switch (kind) {
    case "creds":
      auth.creds = fromFlags ? flag.creds : fromEnv.creds
      break
    case "nkey":
      auth.nkey = fromFlags ? flag.nkey : fromEnv.nkey
      break
    case "user":
      auth.user = flag.user ?? fromEnv.user
      auth.password = flag.password ?? fromEnv.password
      if (auth.user === undefined) throw new AuthUsageError("--password needs a user: --user U (or $NATS_USER)")
      if (auth.password === undefined) throw new AuthUsageError(`user ${auth.user} needs a password: --password P (or $NATS_PASSWORD, which keeps it off the command line)`)
      break
    case "token":
      auth.token = fromFlags ? flag.token : fromEnv.token
      break
  }
  const ca = nonEmpty(v["tls-ca"]) ?? nonEmpty(env.NATS_CA)
  const cert = nonEmpty(v["tls-cert"]) ?? nonEmpty(env.NATS_CERT)
  const key = nonEmpty(v["tls-key"]) ?? nonEmpty(env.NATS_KEY)
  if (ca !== undefined || cert !== undefined || key !== undefined) {
    auth.tls = { ...(ca !== undefined ? { ca } : {}), ...(cert !== undefined ? { cert } : {}), ...(key !== undefined ? { key } : {}) }
  }
  if (kind === undefined && auth.tls === undefined) return undefined
  try {
    natsConnectAuth(auth) // reads and checks every file now: a bad one is named before anything connects
  } catch (e) {
    throw new AuthUsageError((e as Error).message)
  }
  return auth
}

/** The environment that hands `auth` to a child process (it reads it with authFromArgs). */
export const authEnv = (auth: NatsAuth | undefined): Record<string, string> => {
  const out: Record<string, string> = {}
  if (auth === undefined) return out
  if (auth.creds !== undefined) out.NATS_CREDS = auth.creds
  if (auth.nkey !== undefined) out.NATS_NKEY = auth.nkey
  if (auth.user !== undefined) out.NATS_USER = auth.user
  if (auth.password !== undefined) out.NATS_PASSWORD = auth.password
  if (auth.token !== undefined) out.NATS_TOKEN = auth.token
  if (auth.tls?.ca !== undefined) out.NATS_CA = auth.tls.ca
  if (auth.tls?.cert !== undefined) out.NATS_CERT = auth.tls.cert
  if (auth.tls?.key !== undefined) out.NATS_KEY = auth.tls.key
  return out
}

/** `env` without any NATS credential variable (a child then gets exactly the one it is given). */
export const withoutAuthEnv = (env: NodeJS.ProcessEnv): NodeJS.ProcessEnv => {
  const out: NodeJS.ProcessEnv = { ...env }
  for (const k of AUTH_ENV) delete out[k]
  return out
}
