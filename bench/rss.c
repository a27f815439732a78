/* Peak memory of one sandrun run, for bench/rss.sh and bench/stage.sh.
 *
 *   rss OUT BINARY COMMAND [ARG]...
 *
 * Runs COMMAND and, until it exits, samples /proc every INTERVAL_US. A process counts
 * as sandrun's when it descends from COMMAND's process (or is it) and runs BINARY:
 * its /proc/PID/exe is BINARY, or, where that link cannot be read (a rootless runner
 * that changed its ids in its user namespace is no longer dumpable), its name is
 * BINARY's or one of libcontainer's (`youki:...`, before it executes the step's
 * program). That is the runner, its zygote, the per-step helpers and libcontainer's
 * processes. Appends one line to the file OUT, in kB:
 *
 *   RUNNER_HWM LARGEST_HWM PEAK_RSS_SUM PEAK_PSS_SUM PEAK_PROCESSES
 *
 * - RUNNER_HWM:     VmHWM of COMMAND's own process (the `sandrun run` process).
 * - LARGEST_HWM:    the largest VmHWM of any sandrun process seen.
 * - PEAK_RSS_SUM:   the largest sum, over one sample, of the sandrun processes' VmRSS
 *                   (pages shared between them, the binary's code and what a fork
 *                   shares, count once per process: an upper bound).
 * - PEAK_PSS_SUM:   the same with proportional set sizes (smaps_rollup: shared pages
 *                   divided among their sharers), or -1 when some process's could not
 *                   be read (rootless, see above).
 * - PEAK_PROCESSES: the most sandrun processes alive in one sample.
 *
 * VmHWM only grows, so a process's peak is its last reading before it exits; a
 * process that lives shorter than one interval can be missed by the other figures.
 * Exits with COMMAND's status. Not a test: a tool for the benchmarks.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <libgen.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define INTERVAL_US 2000
#define MAX_PROCS 65536

struct proc {
    int pid, ppid;
    char comm[32];
};

static struct proc procs[MAX_PROCS];
static int nprocs;

/* The value in kB of the line starting with KEY in FILE, or -1. */
static long field_kb(const char *file, const char *key) {
    char line[256];
    size_t n = strlen(key);
    long v = -1;
    FILE *f = fopen(file, "re");
    if (!f) return -1;
    while (fgets(line, sizeof line, f)) {
        if (strncmp(line, key, n) == 0) {
            v = strtol(line + n, NULL, 10);
            break;
        }
    }
    fclose(f);
    return v;
}

/* Name and parent of PID from /proc/PID/status; 0 when it is gone. */
static int read_proc(int pid, struct proc *p) {
    char file[64], line[256];
    snprintf(file, sizeof file, "/proc/%d/status", pid);
    FILE *f = fopen(file, "re");
    if (!f) return 0;
    p->pid = pid;
    p->ppid = 0;
    p->comm[0] = 0;
    while (fgets(line, sizeof line, f)) {
        if (strncmp(line, "Name:\t", 6) == 0) {
            snprintf(p->comm, sizeof p->comm, "%.31s", line + 6);
            p->comm[strcspn(p->comm, "\n")] = 0;
        } else if (strncmp(line, "PPid:\t", 6) == 0) {
            p->ppid = atoi(line + 6);
            break;
        }
    }
    fclose(f);
    return 1;
}

static int descends_from(int pid, int ancestor) {
    for (int depth = 0; depth < 64 && pid > 1; depth++) {
        if (pid == ancestor) return 1;
        int parent = 0;
        for (int i = 0; i < nprocs; i++) {
            if (procs[i].pid == pid) {
                parent = procs[i].ppid;
                break;
            }
        }
        pid = parent;
    }
    return 0;
}

/* 1 when P runs BINARY (NAME: its first 15 characters, as the kernel keeps them). */
static int runs_binary(const struct proc *p, const char *binary, const char *name) {
    char path[64], exe[PATH_MAX];
    snprintf(path, sizeof path, "/proc/%d/exe", p->pid);
    ssize_t n = readlink(path, exe, sizeof exe - 1);
    if (n >= 0) {
        exe[n] = 0;
        return strcmp(exe, binary) == 0;
    }
    return strcmp(p->comm, name) == 0 || strncmp(p->comm, "youki:", 6) == 0;
}

int main(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: rss OUT BINARY COMMAND [ARG]...\n");
        return 2;
    }
    FILE *out = fopen(argv[1], "ae");
    if (!out) {
        perror(argv[1]);
        return 2;
    }
    char binary[PATH_MAX], base[PATH_MAX], name[16];
    if (!realpath(argv[2], binary)) {
        perror(argv[2]);
        return 2;
    }
    snprintf(base, sizeof base, "%s", binary);
    snprintf(name, sizeof name, "%s", basename(base));
    pid_t child = fork();
    if (child < 0) {
        perror("fork");
        return 2;
    }
    if (child == 0) {
        execvp(argv[3], argv + 3);
        perror(argv[3]);
        _exit(127);
    }
    long runner = 0, largest = 0, rss_peak = 0, pss_peak = 0, procs_peak = 0;
    int pss_unreadable = 0, status = 0;
    struct timespec pause = {0, INTERVAL_US * 1000L};
    for (;;) {
        DIR *d = opendir("/proc");
        if (!d) {
            perror("/proc");
            return 2;
        }
        struct dirent *e;
        nprocs = 0;
        while ((e = readdir(d)) && nprocs < MAX_PROCS) {
            if (e->d_name[0] < '1' || e->d_name[0] > '9') continue;
            if (read_proc(atoi(e->d_name), &procs[nprocs])) nprocs++;
        }
        closedir(d);
        long rss_sum = 0, pss_sum = 0, count = 0;
        for (int i = 0; i < nprocs; i++) {
            const struct proc *p = &procs[i];
            if (!descends_from(p->pid, child) || !runs_binary(p, binary, name)) continue;
            char file[64];
            snprintf(file, sizeof file, "/proc/%d/status", p->pid);
            long hwm = field_kb(file, "VmHWM:");
            long rss = field_kb(file, "VmRSS:");
            if (hwm < 0 || rss < 0) continue; /* gone */
            count++;
            rss_sum += rss;
            if (hwm > largest) largest = hwm;
            if (p->pid == child && hwm > runner) runner = hwm;
            snprintf(file, sizeof file, "/proc/%d/smaps_rollup", p->pid);
            long pss = field_kb(file, "Pss:");
            snprintf(file, sizeof file, "/proc/%d/status", p->pid);
            if (pss >= 0)
                pss_sum += pss;
            else if (field_kb(file, "VmRSS:") >= 0)
                pss_unreadable = 1; /* still there: not readable by us */
        }
        if (rss_sum > rss_peak) rss_peak = rss_sum;
        if (pss_sum > pss_peak) pss_peak = pss_sum;
        if (count > procs_peak) procs_peak = count;
        pid_t w = waitpid(child, &status, WNOHANG);
        if (w == child) break;
        if (w < 0) {
            perror("waitpid");
            return 2;
        }
        nanosleep(&pause, NULL);
    }
    fprintf(out, "%ld %ld %ld %ld %ld\n", runner, largest, rss_peak, pss_unreadable ? -1 : pss_peak,
            procs_peak);
    if (fclose(out) != 0) {
        perror(argv[1]);
        return 2;
    }
    if (WIFEXITED(status)) return WEXITSTATUS(status);
    return 128 + WTERMSIG(status);
}
