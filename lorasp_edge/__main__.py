from lorasp_edge.cli import main

raise SystemExit(main())
