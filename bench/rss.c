/* Peak memory of one sandrun run, for bench/rss.sh and bench/stage.sh.
 *
 *   rss BINARY COMMAND [ARG]...
 *
 * Runs COMMAND and, until it exits, samples /proc every INTERVAL_US: every process
 * whose executable is BINARY (sandrun's runner, zygote, per-step helpers and
 * libcontainer's processes before they execute the step's program) counts as sandrun.
 * Prints one line, in kB:
 *
 *   RUNNER_HWM LARGEST_HWM PEAK_PSS_SUM PEAK_PROCESSES
 *
 * - RUNNER_HWM:     VmHWM of COMMAND's process once it executes BINARY (the `sandrun
 *                   run` process; started through setpriv or env it is the same pid).
 * - LARGEST_HWM:    the largest VmHWM of any sandrun process seen.
 * - PEAK_PSS_SUM:   the largest sum, over one sample, of the sandrun processes'
 *                   proportional set sizes (smaps_rollup: pages shared between the
 *                   runner and the processes it forked count once in all).
 * - PEAK_PROCESSES: the most sandrun processes alive in one sample.
 *
 * VmHWM only grows, so a process's peak is its last reading before it exits; a
 * process that lives shorter than one interval can be missed by the other figures.
 * Exits with COMMAND's status. Not a test: a tool for the benchmarks.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define INTERVAL_US 2000

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

static int is_binary(const char *pid, const char *binary) {
    char path[300], exe[PATH_MAX];
    snprintf(path, sizeof path, "/proc/%s/exe", pid);
    ssize_t n = readlink(path, exe, sizeof exe - 1);
    if (n < 0) return 0;
    exe[n] = 0;
    return strcmp(exe, binary) == 0;
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: rss BINARY COMMAND [ARG]...\n");
        return 2;
    }
    char binary[PATH_MAX];
    if (!realpath(argv[1], binary)) {
        perror(argv[1]);
        return 2;
    }
    pid_t child = fork();
    if (child < 0) {
        perror("fork");
        return 2;
    }
    if (child == 0) {
        execvp(argv[2], argv + 2);
        perror(argv[2]);
        _exit(127);
    }
    char child_pid[16];
    snprintf(child_pid, sizeof child_pid, "%d", child);
    long runner = 0, largest = 0, pss_peak = 0, procs_peak = 0;
    int status = 0;
    struct timespec pause = {0, INTERVAL_US * 1000L};
    for (;;) {
        long pss_sum = 0, procs = 0;
        DIR *d = opendir("/proc");
        if (!d) {
            perror("/proc");
            return 2;
        }
        struct dirent *e;
        while ((e = readdir(d))) {
            if (e->d_name[0] < '1' || e->d_name[0] > '9') continue;
            if (!is_binary(e->d_name, binary)) continue;
            char file[300];
            snprintf(file, sizeof file, "/proc/%s/status", e->d_name);
            long hwm = field_kb(file, "VmHWM:");
            if (hwm < 0) continue; /* gone, or a kernel thread */
            procs++;
            if (hwm > largest) largest = hwm;
            if (strcmp(e->d_name, child_pid) == 0 && hwm > runner) runner = hwm;
            snprintf(file, sizeof file, "/proc/%s/smaps_rollup", e->d_name);
            long pss = field_kb(file, "Pss:");
            if (pss > 0) pss_sum += pss;
        }
        closedir(d);
        if (pss_sum > pss_peak) pss_peak = pss_sum;
        if (procs > procs_peak) procs_peak = procs;
        pid_t w = waitpid(child, &status, WNOHANG);
        if (w == child) break;
        if (w < 0) {
            perror("waitpid");
            return 2;
        }
        nanosleep(&pause, NULL);
    }
    printf("%ld %ld %ld %ld\n", runner, largest, pss_peak, procs_peak);
    if (WIFEXITED(status)) return WEXITSTATUS(status);
    return 128 + WTERMSIG(status);
}
