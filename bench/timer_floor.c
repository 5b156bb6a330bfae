/* The floor of a per-CPU 1 ms sampler: one thread per CPU given on the command line,
 * pinned to it, at SCHED_FIFO 1 when permitted (as tsprobe's stall samplers), reading a
 * periodic CLOCK_MONOTONIC timerfd on the grid and doing nothing else. bench/agent_overhead
 * builds it with cc and runs it beside the agent and cyclictest: what waking every
 * interval on every CPU costs by itself, with no work per wake-up.
 *
 * usage: timer_floor INTERVAL_NS CPU [CPU ...]
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

static long interval_ns;

static void *tick(void *arg) {
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET((int)(intptr_t)arg, &set);
    if (sched_setaffinity(0, sizeof set, &set)) {
        perror("timer_floor: sched_setaffinity");
        exit(1);
    }
    struct sched_param param = {.sched_priority = 1};
    (void)sched_setscheduler(0, SCHED_FIFO, &param); /* SCHED_OTHER when not permitted */
    int fd = timerfd_create(CLOCK_MONOTONIC, TFD_CLOEXEC);
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    long long first = ((now.tv_sec * 1000000000LL + now.tv_nsec) / interval_ns + 2) * interval_ns;
    struct itimerspec spec = {
        .it_interval = {interval_ns / 1000000000L, interval_ns % 1000000000L},
        .it_value = {first / 1000000000LL, first % 1000000000LL},
    };
    if (fd < 0 || timerfd_settime(fd, TFD_TIMER_ABSTIME, &spec, NULL)) {
        perror("timer_floor: timerfd");
        exit(1);
    }
    uint64_t expirations;
    while (read(fd, &expirations, sizeof expirations) == sizeof expirations)
        ;
    perror("timer_floor: read");
    exit(1);
}

int main(int argc, char **argv) {
    if (argc < 3 || (interval_ns = atol(argv[1])) <= 0) {
        fprintf(stderr, "usage: timer_floor INTERVAL_NS CPU [CPU ...]\n");
        return 2;
    }
    pthread_t threads[argc];
    for (int i = 2; i < argc; i++)
        pthread_create(&threads[i], NULL, tick, (void *)(intptr_t)atoi(argv[i]));
    for (int i = 2; i < argc; i++)
        pthread_join(threads[i], NULL);
    return 0;
}
