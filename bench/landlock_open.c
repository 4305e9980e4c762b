/* bench/landlock_open.sh: ns per open(O_RDONLY)+close of FILE under a Landlock domain.
 * landlock_open MODE RULE FILE N
 *   MODE none: no Landlock;
 *        read: one rule on RULE granting read (what a read-only path got before aef50b6),
 *              every file-system right handled, as corral's ruleset;
 *        read+truncate: the same rule also granting truncate (corral's rule now, where the
 *              path and every mount beneath it are read-only).
 * Landlock asks for truncate at every open (kept with the file for ftruncate), so without it
 * the walk from FILE goes up to the root whatever RULE is. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <linux/landlock.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define TRUNCATE (1ULL << 14) /* LANDLOCK_ACCESS_FS_TRUNCATE, ABI 3: newer than Debian 12's headers */
#define ALL_FS ((1ULL << 16) - 1) /* every right up to IOCTL_DEV (ABI 5) */

int main(int argc, char **argv) {
  if (argc != 5) {
    fprintf(stderr, "usage: landlock_open none|read|read+truncate RULE FILE N\n");
    return 2;
  }
  long n = atol(argv[4]);
  if (strcmp(argv[1], "none") != 0) {
    struct landlock_ruleset_attr attr = {.handled_access_fs = ALL_FS};
    int ruleset = syscall(SYS_landlock_create_ruleset, &attr, sizeof attr, 0);
    struct landlock_path_beneath_attr rule = {
        .allowed_access = LANDLOCK_ACCESS_FS_READ_FILE | LANDLOCK_ACCESS_FS_READ_DIR};
    struct stat st;
    if (strcmp(argv[1], "read+truncate") == 0) rule.allowed_access |= TRUNCATE;
    rule.parent_fd = open(argv[2], O_PATH | O_CLOEXEC);
    if (ruleset < 0 || rule.parent_fd < 0 || fstat(rule.parent_fd, &st) != 0) {
      perror("landlock_open: ruleset or rule path");
      return 1;
    }
    if (!S_ISDIR(st.st_mode)) rule.allowed_access &= ~(__u64)LANDLOCK_ACCESS_FS_READ_DIR;
    if (syscall(SYS_landlock_add_rule, ruleset, LANDLOCK_RULE_PATH_BENEATH, &rule, 0) != 0 ||
        prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 ||
        syscall(SYS_landlock_restrict_self, ruleset, 0) != 0) {
      perror("landlock_open: restrict");
      return 1;
    }
  }
  struct timespec t0, t1;
  for (int pass = 0; pass < 2; pass++) { /* the first pass warms the caches */
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (long i = 0; i < n; i++) {
      int fd = open(argv[3], O_RDONLY | O_CLOEXEC);
      if (fd < 0) {
        perror("landlock_open: open");
        return 1;
      }
      close(fd);
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
  }
  printf("%.0f\n", ((t1.tv_sec - t0.tv_sec) * 1e9 + (t1.tv_nsec - t0.tv_nsec)) / n);
  return 0;
}
