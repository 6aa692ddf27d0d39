'use strict';
// Shared by the Node peers: arguments, HS256 token check, rooms and the in-memory log.
const crypto = require('crypto');

function args(argv) {
  const out = { port: 0, secret: '' };
  for (let i = 2; i < argv.length; i += 2) out[argv[i].replace(/^--/, '')] = argv[i + 1];
  out.port = Number(out.port);
  return out;
}

// The same check chatd makes: HS256 signature, then `exp`. Returns the subject or null.
function verify(token, secret) {
  const parts = String(token || '').split('.');
  if (parts.length !== 3) return null;
  const sig = crypto.createHmac('sha256', secret).update(parts[0] + '.' + parts[1]).digest('base64url');
  if (sig.length !== parts[2].length || !crypto.timingSafeEqual(Buffer.from(sig), Buffer.from(parts[2]))) return null;
  let claims;
  try { claims = JSON.parse(Buffer.from(parts[1], 'base64url').toString()); } catch (e) { return null; }
  if (typeof claims.sub !== 'string' || !(claims.exp > Date.now() / 1000)) return null;
  return claims.sub;
}

// Rooms: id -> {members: Set(user), seq, log: recent events}. Not durable: the peers keep
// everything in memory (chatd commits every send to PostgreSQL before acking it).
class Rooms {
  constructor() { this.rooms = new Map(); this.next = 1; this.dms = new Map(); this.byUser = new Map(); }
  create(members) {
    const id = this.next++;
    this.rooms.set(id, { members: new Set(members), seq: 0, log: [] });
    for (const user of members) {
      if (!this.byUser.has(user)) this.byUser.set(user, new Set());
      this.byUser.get(user).add(id);
    }
    return id;
  }
  of(user) { return this.byUser.get(user) || []; }
  dm(a, b) {
    const key = a < b ? a + '\u0000' + b : b + '\u0000' + a;
    let id = this.dms.get(key);
    if (id === undefined) { id = this.create([a, b]); this.dms.set(key, id); }
    return id;
  }
  append(id, sender, body) {
    const room = this.rooms.get(id);
    if (!room || !room.members.has(sender)) return null;
    const event = { type: 'event', room_id: id, seq: ++room.seq, kind: 'message', sender, at: Date.now() / 1000, data: { body } };
    room.log.push(event);
    if (room.log.length > 100) room.log.shift();
    return { room, event };
  }
}

module.exports = { args, verify, Rooms };
