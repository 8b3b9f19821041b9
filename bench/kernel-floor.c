/*
 * The kernel's own floor for bench/cascade.ts (docs/performance.md, "The three floors"):
 * the kernel work of one reclaim cascade, and nothing else, in raw system calls.
 *
 * This program writes cgroupfs itself. In the product only cgroup-adapter/ does
 * (CONTRIBUTING.md, "cgroup-adapter/ owns cgroupfs"); a benchmark's floor that went
 * through the adapter would measure the adapter, which is what the "adapter floor" in
 * the same bench does. Here the point is to leave everything out but the kernel: the
 * groups and their shells are made by the bench through the adapter, untimed, and this
 * program only does the timed part on them.
 *
 *   kernel-floor run SPECFILE [--held]
 *     SPECFILE, one line per action, fields separated by a tab, in rank order:
 *       W <file> <value>          open, write the value, close (a limit file)
 *       S <cgroup.procs> <cgroup.events>
 *                                 read the pids, SIGTERM each (kill(2)), then wait
 *     Every line "run" on stdin is one timed run: the W and S lines in order, then a
 *     wait until every S group's cgroup.events says "populated 0" (inotify on the
 *     events files, set up once, with a 50 ms poll as the fallback, as cgroup-adapter's
 *     waitEmpty does; Documentation/admin-guide/cgroup-v2.rst, "cgroup.events").
 *     Answers "ok <ns to the last signal> <ns until every group is empty>" or
 *     "error <what>". --held opens every file once at start and uses pwrite/pread on
 *     the held descriptors (what a program keeping ~4 descriptors a project open pays).
 *
 *   kernel-floor fsync DIR N
 *     N samples, one line each: "<ns> <ns>": a 128-byte pwrite + fsync(2) of one file in
 *     DIR, then the journal's atomic write (a new temp file, write, fdatasync(2), rename(2),
 *     fsync of DIR; agent/common/journal.ts).
 *
 * Built by the bench with the system's cc (cc -O2 -o kernel-floor kernel-floor.c).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/inotify.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

struct action {
  char kind; /* 'W' or 'S' */
  char *file;  /* W: the limit file; S: cgroup.procs */
  char *value; /* W: what to write; S: cgroup.events */
  size_t len;
  int fd;    /* --held: W's file or S's cgroup.procs */
  int evfd;  /* S: cgroup.events, always held (read with pread) */
  int wd;    /* S: inotify watch on cgroup.events */
  int pending;
};

static long long now_ns(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (long long)t.tv_sec * 1000000000LL + t.tv_nsec;
}

static void fail(const char *what, const char *file) {
  printf("error %s %s: %s\n", what, file, strerror(errno));
  fflush(stdout);
}

static int populated(int fd) {
  char buf[256];
  ssize_t n = pread(fd, buf, sizeof buf - 1, 0);
  if (n < 0) return -1;
  buf[n] = 0;
  return strstr(buf, "populated 0") == NULL;
}

static int run_mode(const char *spec, int held) {
  FILE *f = fopen(spec, "r");
  if (!f) {
    fail("open", spec);
    return 1;
  }
  struct action *a = NULL;
  size_t n = 0, cap = 0;
  char *line = NULL;
  size_t lcap = 0;
  ssize_t ll;
  while ((ll = getline(&line, &lcap, f)) > 0) {
    if (line[ll - 1] == '\n') line[--ll] = 0;
    if (ll == 0) continue;
    char *k = strtok(line, "\t"), *p = strtok(NULL, "\t"), *v = strtok(NULL, "\t");
    if (!k || !p || !v || (k[0] != 'W' && k[0] != 'S')) {
      printf("error spec line %zu\n", n + 1);
      return 1;
    }
    if (n == cap) a = realloc(a, (cap = cap ? cap * 2 : 64) * sizeof *a);
    a[n] = (struct action){k[0], strdup(p), strdup(v), strlen(v), -1, -1, -1, 0};
    n++;
  }
  fclose(f);
  int ino = inotify_init1(IN_NONBLOCK | IN_CLOEXEC);
  if (ino < 0) {
    fail("inotify_init1", "");
    return 1;
  }
  for (size_t i = 0; i < n; i++) {
    if (held) {
      a[i].fd = open(a[i].file, (a[i].kind == 'W' ? O_WRONLY : O_RDONLY) | O_CLOEXEC);
      if (a[i].fd < 0) {
        fail("open", a[i].file);
        return 1;
      }
    }
    if (a[i].kind != 'S') continue;
    a[i].evfd = open(a[i].value, O_RDONLY | O_CLOEXEC);
    if (a[i].evfd < 0) {
      fail("open", a[i].value);
      return 1;
    }
    a[i].wd = inotify_add_watch(ino, a[i].value, IN_MODIFY);
    if (a[i].wd < 0) {
      fail("inotify_add_watch", a[i].value);
      return 1;
    }
  }
  printf("ready %zu\n", n);
  fflush(stdout);

  char cmd[64], buf[65536];
  while (fgets(cmd, sizeof cmd, stdin)) {
    /* Events of the untimed reset (groups populated again) are not this run's. */
    while (read(ino, buf, sizeof buf) > 0) {
    }
    int err = 0;
    size_t pending = 0;
    long long t0 = now_ns();
    for (size_t i = 0; i < n && !err; i++) {
      struct action *x = &a[i];
      if (x->kind == 'W') {
        int fd = held ? x->fd : open(x->file, O_WRONLY | O_CLOEXEC);
        if (fd < 0 || (held ? pwrite(fd, x->value, x->len, 0) : write(fd, x->value, x->len)) < 0) {
          fail("write", x->file);
          err = 1;
        }
        if (!held && fd >= 0) close(fd);
        continue;
      }
      int fd = held ? x->fd : open(x->file, O_RDONLY | O_CLOEXEC);
      ssize_t got = fd < 0 ? -1 : held ? pread(fd, buf, sizeof buf - 1, 0) : read(fd, buf, sizeof buf - 1);
      if (!held && fd >= 0) close(fd);
      if (got < 0) {
        fail("read", x->file);
        err = 1;
        break;
      }
      buf[got] = 0;
      for (char *s = buf, *e; *s; s = e) {
        long pid = strtol(s, &e, 10);
        if (e == s) break;
        if (pid > 0 && kill((pid_t)pid, SIGTERM) < 0 && errno != ESRCH) {
          fail("kill", x->file);
          err = 1;
        }
      }
      x->pending = 1;
      pending++;
    }
    long long t1 = now_ns();
    long long deadline = t0 + 10000000000LL;
    while (!err && pending > 0) {
      for (size_t i = 0; i < n; i++) {
        if (!a[i].pending) continue;
        int p = populated(a[i].evfd);
        if (p < 0) {
          fail("read", a[i].value);
          err = 1;
          break;
        }
        if (!p) {
          a[i].pending = 0;
          pending--;
        }
      }
      if (err || pending == 0) break;
      if (now_ns() > deadline) {
        printf("error timeout: %zu groups still populated after 10 s\n", pending);
        fflush(stdout);
        err = 1;
        break;
      }
      struct pollfd pfd = {ino, POLLIN, 0};
      poll(&pfd, 1, 50);
      while (read(ino, buf, sizeof buf) > 0) {
      }
    }
    long long t2 = now_ns();
    for (size_t i = 0; i < n; i++) a[i].pending = 0;
    if (!err) printf("ok %lld %lld\n", t1 - t0, t2 - t0);
    fflush(stdout);
  }
  return 0;
}

static int fsync_mode(const char *dir, int samples) {
  char file[4096], tmp[4096], target[4096];
  snprintf(file, sizeof file, "%s/kernel-floor-fsync.%d", dir, (int)getpid());
  snprintf(tmp, sizeof tmp, "%s/kernel-floor-atomic.%d.tmp", dir, (int)getpid());
  snprintf(target, sizeof target, "%s/kernel-floor-atomic.%d", dir, (int)getpid());
  int fd = open(file, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  int dfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0 || dfd < 0) {
    fail("open", dir);
    return 1;
  }
  char rec[128];
  memset(rec, 'x', sizeof rec);
  rec[sizeof rec - 1] = '\n';
  for (int i = 0; i < samples; i++) {
    long long t0 = now_ns();
    if (pwrite(fd, rec, sizeof rec, 0) != (ssize_t)sizeof rec || fsync(fd) < 0) {
      fail("fsync", file);
      return 1;
    }
    long long t1 = now_ns();
    int tfd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (tfd < 0 || write(tfd, rec, sizeof rec) != (ssize_t)sizeof rec || fdatasync(tfd) < 0 ||
        close(tfd) < 0 || rename(tmp, target) < 0 || fsync(dfd) < 0) {
      fail("atomic write", target);
      return 1;
    }
    long long t2 = now_ns();
    printf("%lld %lld\n", t1 - t0, t2 - t1);
  }
  close(fd);
  close(dfd);
  unlink(file);
  unlink(target);
  fflush(stdout);
  return 0;
}

int main(int argc, char **argv) {
  if (argc >= 3 && strcmp(argv[1], "run") == 0)
    return run_mode(argv[2], argc >= 4 && strcmp(argv[3], "--held") == 0);
  if (argc == 4 && strcmp(argv[1], "fsync") == 0) return fsync_mode(argv[2], atoi(argv[3]));
  fprintf(stderr, "usage: kernel-floor run SPECFILE [--held] | kernel-floor fsync DIR N\n");
  return 2;
}
